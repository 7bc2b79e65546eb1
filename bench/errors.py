"""The one error the bench modules raise for a usage or setup problem (a bad flag, a
missing prompt set or model): the command line prints it and exits with code 2."""


class BenchError(RuntimeError):
  pass
