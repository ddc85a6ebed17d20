"""All-in-one dev server: every ARM service that exists, in one process on one port, on embedded
SQLite files under .arm/, for a first run with no set-up."""
