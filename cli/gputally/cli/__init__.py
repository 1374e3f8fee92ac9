"""The ``gputally`` command's front door, shared by every subcommand.

``main`` builds the parser from the modules that define the commands, reads each command's
configuration (flag, environment, TOML file, default), sets up logging and runs the handler;
``options`` holds the argument types every command shares. Neither depends on the agent or the
collector: a command's module is imported only when that command (or the full help) is asked
for, so ``gputally agent`` never loads the collector and ``gputally audit verify`` never loads
the agent.
"""
