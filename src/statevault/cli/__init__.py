"""The ``statevault`` command line: ``statevault inspect PATH``, ``statevault verify PATH``.

One module per subcommand, each with the same two functions::

    register(subparsers)  # add its parser; set_defaults(handler=run) via common.add_command
    run(args) -> int      # do the work, print the result, return an ExitCode

and one line in :data:`statevault.cli.main.COMMANDS` to list it. ``main`` parses the arguments,
calls the chosen ``run`` and turns every :class:`~statevault.errors.CheckpointError` into a clean
message and an exit code (see :mod:`statevault.cli.main` for the table). Importing the CLI imports
neither torch nor tensorflow: inspecting or verifying a checkpoint never builds a tensor.
"""
