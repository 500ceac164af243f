"""Preference data: files and hub datasets read and checked row by row (`pairs`), chat rendering (`chat`)."""
