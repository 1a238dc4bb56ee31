"""``python -m zae_trainer``: the ``zae-trainer`` command line (see :mod:`zae_trainer.cli`)."""

from .cli import main

raise SystemExit(main())
