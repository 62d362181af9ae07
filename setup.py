# The cffi build of cext/ needs setup()'s cffi_modules hook, which pyproject.toml
# alone cannot express; everything else lives in pyproject.toml. The man pages and
# the bash completion (made by python -m relay.docgen) go under the prefix's share/,
# where man finds them beside bin/ and bash-completion by the command's name.
from setuptools import setup

setup(cffi_modules=["cext/build.py:ffibuilder"],
      data_files=[("share/man/man8", ["docs/man/relay.8"]),
                  ("share/man/man5", ["docs/man/relay.toml.5"]),
                  ("share/bash-completion/completions", ["docs/completion/relay.bash"])])
