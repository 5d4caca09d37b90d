"""``python -m lip_cuda.train``."""
from .run import cli

if __name__ == "__main__":
    cli()
