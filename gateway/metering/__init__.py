"""Hold and settle, the script connection, Lua registration, accounts rebuild, the usage writer."""
