"""`python -m tokenbridge ...`: the command line (parsed before the library is imported)."""
from .cli_parser import main

main()
