"""`python -m gpu_worker.serving [options]`: one worker process (what `ruvon worker` runs; the launcher's child)."""

import argparse

from gpu_worker.serving.process import add_worker_arguments, run_worker_command

parser = argparse.ArgumentParser(prog="python -m gpu_worker.serving", description="one Ruvon GPU worker")
add_worker_arguments(parser)
raise SystemExit(run_worker_command(parser.parse_args()))
