"""`python -m cllm ...` is the `cllm` command."""
import sys

from .cli import main

sys.exit(main())
