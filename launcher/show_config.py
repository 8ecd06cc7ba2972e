"""`strata config`: what a run would use, before starting it.

    strata config                                          # configs/tiny.yaml, resolved
    strata config --config configs/hybrid-1b3.yaml parallel.tp=2 > run.yaml   # `strata train --config run.yaml` trains the same
    strata config --keys                                   # every key: type, default, what it does
    strata config --keys model.mlp train.lr                # only these sections / keys

Prints the resolved config as YAML (every key, defaults filled in, as the run writes it to
<run_dir>/config.yaml). A bad key, type or value is the same one line and exit code 2 as
`strata train`. Layout checks that need the world size and the tokenizer (does tp divide the
heads, the vocabulary) are made by `strata train` when it starts.
"""
from __future__ import annotations

import argparse
import sys

from strata.launcher.config import ConfigError, describe_keys, dump_yaml, load_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="strata config", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: configs/tiny.yaml)")
    p.add_argument("--keys", action="store_true",
                   help="list the keys (those under the sections or keys given instead of overrides)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.keys and args.config:
            raise ConfigError("--keys lists the schema's keys and defaults, whatever the config; drop --config, "
                              "or leave out --keys to see what the config resolves to")
        if args.keys:
            text = describe_keys(args.overrides)
        else:
            text = dump_yaml(load_config(args.config, args.overrides)).rstrip("\n")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
