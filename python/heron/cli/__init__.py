"""heron's command line (`heron <command>`, `python -m heron <command>`); the parser is in main."""
