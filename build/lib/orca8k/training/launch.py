"""`orca8k train` under several processes: relaunch itself through `torchrun` or the `deepspeed` launcher.

When `train.nproc_per_node × train.num_nodes > 1` and this process was not started by a launcher (no `LOCAL_RANK`),
the stage writes the resolved params to `layout.launch_params` and runs

    torchrun:   python -m torch.distributed.run --nproc_per_node N --nnodes M [--standalone | --node_rank ...]
                    -m orca8k train --params <launch_params>
    deepspeed:  python -m deepspeed.launcher.runner --num_gpus N --num_nodes M [--hostfile H] --no_local_rank
                    --module orca8k train --params <launch_params>

so `dvc repro`, the Prefect task and a shell all start multi-GPU training with the same `orca8k train`. Each child
is one rank; rank 0 alone writes the outputs and logs. Multi-node: the deepspeed launcher reaches the other hosts of
`train.hostfile` over ssh (pdsh) and needs the working directory (and `layout.launch_params`) on a shared file
system; with torchrun, run `orca8k train` on every node with `NODE_RANK`, `MASTER_ADDR`, `MASTER_PORT` set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from orca8k.errors import ConfigError, TrainingError
from orca8k.training.distributed import launched
from orca8k.training.supervise import run_supervised

if TYPE_CHECKING:
    from orca8k.config import Config


def needs_relaunch(cfg: Config) -> bool:
    """True when params ask for several processes and this process is not one of them yet."""
    return cfg.train.world_size > 1 and not launched()


def launch_command(cfg: Config, params_file: Path) -> list[str]:
    """The launcher command line for `cfg.train` (see the module docstring).

    Raises:
        ConfigError: launcher `none` with several processes; torchrun over several nodes without `NODE_RANK`,
            `MASTER_ADDR`, `MASTER_PORT` in the environment; a `train.hostfile` that does not exist.
    """
    t = cfg.train
    target = ["orca8k", "train", "--params", str(params_file)]
    if t.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={t.nproc_per_node}", f"--nnodes={t.num_nodes}"]
        if t.num_nodes == 1:
            cmd.append("--standalone")
        else:
            missing = [v for v in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
            if missing:
                raise ConfigError(
                    f"train.launcher=torchrun with train.num_nodes={t.num_nodes}: set {', '.join(missing)} on every node "
                    "(or use train.launcher=deepspeed with train.hostfile)"
                )
            cmd += [f"--node_rank={os.environ['NODE_RANK']}", f"--master_addr={os.environ['MASTER_ADDR']}",
                    f"--master_port={os.environ['MASTER_PORT']}"]
        return [*cmd, "-m", *target]
    if t.launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(t.nproc_per_node),
               "--num_nodes", str(t.num_nodes)]
        if t.hostfile:
            if not Path(t.hostfile).is_file():
                raise ConfigError(f"train.hostfile={t.hostfile}: file not found from {Path.cwd()}")
            cmd += ["--hostfile", t.hostfile]
        if os.environ.get("MASTER_PORT"):
            cmd += ["--master_port", os.environ["MASTER_PORT"]]
        return [*cmd, "--no_local_rank", "--module", *target]
    raise ConfigError(f"train.nproc_per_node × train.num_nodes = {t.world_size} needs train.launcher torchrun or deepspeed")


def relaunch(cfg: Config, params_file: Path) -> list[str]:
    """Write the resolved params to `params_file`, run the launcher under `run_supervised` and wait for it.

    Returns:
        The command that ran.

    Raises:
        TrainingError: the launcher (any rank) exited with a non-zero status.
    """
    params_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = params_file.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    os.replace(tmp, params_file)
    cmd = launch_command(cfg, params_file)
    print(f"[train] launching {cfg.train.world_size} processes: {' '.join(cmd)}", flush=True)
    try:  # the ranks stop with this process: cancelled (SIGTERM/SIGINT, e.g. a Prefect flow run) or killed
        run_supervised(cmd, grace_seconds=20)  # inside Prefect's 30 s between SIGTERM and SIGKILL
    except subprocess.CalledProcessError as err:
        raise TrainingError(f"{cfg.train.launcher} exited with status {err.returncode} (see the ranks' output above)") from None
    return cmd
