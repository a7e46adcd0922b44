"""`python bench/profile.py [--small] [--variants reference,fast] ...`: where the training step's
time goes (torch.profiler, time by category, Chrome traces); see bench/step_profile.py.

Any script in bench/ has this folder first on sys.path, so an `import profile` there (cProfile does
it, and torch._dynamo imports cProfile) finds this file instead of the standard library's module.
Imported under that name, this file therefore loads and stands in for the standard library module.
"""
import importlib.util
import os
import sys
import sysconfig


def _load_stdlib_profile():
    spec = importlib.util.spec_from_file_location("profile",
                                                  os.path.join(sysconfig.get_paths()["stdlib"], "profile.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["profile"] = module  # the import statement that loaded this file returns this module
    spec.loader.exec_module(module)


if __name__ == "__main__":
    from step_profile import main

    main()
else:
    _load_stdlib_profile()
