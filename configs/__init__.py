"""guidedflow configs: `get_config(arg)` files for `--config configs/NAME.py[:arg]`."""
