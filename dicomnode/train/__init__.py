"""Training commands: one module per ``dicomnode train ...`` command, reusing ``dicomnode.analyse``."""
