"""``python -m megatron_simpo`` is the ``megatron-simpo`` command."""

from megatron_simpo.cli import main

raise SystemExit(main())
