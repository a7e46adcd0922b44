"""The paper's evaluations of a pretrained teacher: k-NN sweep, linear probe, low-shot logistic regression,
fine-tuning. `python -m moca_fast.eval {knn,linear,lowshot,finetune} --help`."""
