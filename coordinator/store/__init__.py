"""Redis: the connection factory (URL -> client), key names and Lua scripts."""
