"""The ledger wing: the git-tracked folder through which nodes exchange events. Files
(reading them safely), export, import, verify, whose keys to believe (keyring), and
sync, the only code that knows git (git.py drives it without trusting the remote)."""
