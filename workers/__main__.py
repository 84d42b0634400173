"""`python -m workers --index I --config EFFECTIVE.json --bus ENDPOINT`, run by the supervisor."""

import argparse

from workers.worker import main

parser = argparse.ArgumentParser(prog="python -m workers")
parser.add_argument("--index", type=int, required=True)
parser.add_argument("--config", required=True, help="effective config (JSON) from the supervisor")
parser.add_argument("--bus", required=True, help="ZeroMQ endpoint of the supervisor's router")
args = parser.parse_args()
main(args.index, args.config, args.bus)
