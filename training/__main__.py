"""``python -m training --config CONFIG.toml`` (or ``accelerate launch ... -m training``)."""

from training.trainer import main

raise SystemExit(main())
