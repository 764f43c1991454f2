"""``python -m statevault.cli``: the same as the ``statevault`` console script."""

from statevault.cli.main import main

raise SystemExit(main())
