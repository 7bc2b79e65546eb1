"""`python -m ssd_jax.launch [flags]`: the command line (ssd_jax/cli.py)."""

from ssd_jax.cli import entry

if __name__ == "__main__":
  entry()
