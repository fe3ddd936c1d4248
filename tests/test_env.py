"""Rank, world size and master address from torchrun's or SLURM's variables."""

from cluster.env import DistEnv, detect, first_slurm_host


def test_torchrun_variables_win():
    env = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
                  "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert env == DistEnv(3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_tasks():
    env = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                  "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 8, 1, "slurm")
    assert env.master_addr == "gpu07"


def test_single_process_and_slurm_single_task():
    assert detect({}) == DistEnv() and not DistEnv().distributed
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "none"


def test_nodelist_forms():
    assert first_slurm_host("node01") == "node01"
    assert first_slurm_host("a1,a2") == "a1"
    assert first_slurm_host("rack[3,5-9]") == "rack3"
