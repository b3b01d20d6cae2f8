"""Table-driven tests of `detect()` for every launcher, and of every bad-input case."""

from __future__ import annotations

import dataclasses

import pytest

import distlib as dl
from distlib.env import Env, Hardware, detect
from distlib.errors import ConfigError, DistlibError, EnvError, PrecisionError

CPU = Hardware()
TWO_GPUS = Hardware(num_gpus=2)

TORCHRUN = {
    "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "4", "MASTER_ADDR": "node0", "MASTER_PORT": "29400",
    "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True",
}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    "OMPI_COMM_WORLD_NODE_RANK": "1", "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "1234",
}
INTELMPI = {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4",
            "MASTER_ADDR": "10.1.1.2"}
MVAPICH = {"MV2_COMM_WORLD_RANK": "6", "MV2_COMM_WORLD_SIZE": "8",
           "MV2_COMM_WORLD_LOCAL_RANK": "2", "MV2_COMM_WORLD_LOCAL_SIZE": "4",
           "MASTER_ADDR": "10.1.1.3"}
SLURM = {
    "SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0", "SLURM_NODEID": "3",
    "SLURM_NNODES": "4", "SLURM_TASKS_PER_NODE": "2(x3),1",
    "SLURM_JOB_NODELIST": "gpu[01-03],cpu7", "SLURM_JOB_ID": "123456",
}

# name, environ, hardware, expected fields
CASES = [
    ("nothing", {}, CPU, dict(rank=0, world_size=1, launcher="none", device="cpu",
                              backend="gloo", strategy=dl.Single())),
    ("torchrun", TORCHRUN, TWO_GPUS, dict(
        rank=3, world_size=8, local_rank=1, local_world_size=2, node_rank=1, num_nodes=4,
        master_addr="node0", master_port=29400, restart_count=2, agent_store=True,
        device="cuda:1", backend="nccl", launcher="torchrun", strategy=dl.DDP())),
    ("distlib", {**TORCHRUN, "DISTLIB_LAUNCHED": "1", "DISTLIB_STRATEGY": "fsdp",
                 "DISTLIB_STRATEGY_OPTIONS": '{"cpu_offload": true}',
                 "DISTLIB_PRECISION": "bf16"}, CPU,
     dict(launcher="distlib", strategy=dl.FSDP(cpu_offload=True), precision=dl.Precision.BF16)),
    ("openmpi", OPENMPI, CPU, dict(rank=5, world_size=8, local_rank=1, local_world_size=4,
                                   node_rank=1, num_nodes=2, master_addr="10.1.1.1",
                                   master_port=1234, launcher="openmpi")),
    ("intelmpi", INTELMPI, CPU, dict(rank=5, world_size=8, local_rank=1, local_world_size=4,
                                     node_rank=1, num_nodes=2, launcher="intelmpi")),
    ("mvapich", MVAPICH, CPU, dict(rank=6, world_size=8, local_rank=2, node_rank=1,
                                   launcher="mvapich", master_addr="10.1.1.3")),
    ("slurm", SLURM, TWO_GPUS, dict(
        rank=6, world_size=7, local_rank=0, local_world_size=1, node_rank=3, num_nodes=4,
        master_addr="gpu01", master_port=15000 + 123456 % 50000, launcher="slurm",
        device="cuda:0")),
    # innermost launcher wins: srun torchrun -> torchrun's variables
    ("srun torchrun", {**SLURM, **TORCHRUN}, CPU, dict(rank=3, world_size=8,
                                                       launcher="torchrun")),
    ("mpirun under slurm", {**SLURM, **OPENMPI}, CPU, dict(rank=5, launcher="openmpi")),
    ("slurm one node", {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
                        "SLURM_NODEID": "0", "SLURM_NNODES": "1",
                        "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODELIST": "box1"}, CPU,
     dict(rank=1, local_rank=1, local_world_size=2, master_addr="box1")),
    ("force cpu", {**TORCHRUN, "DISTLIB_CPU": "1"}, TWO_GPUS, dict(device="cpu", backend="gloo")),
    ("gpus wrap around", {**TORCHRUN, "LOCAL_RANK": "1"}, Hardware(num_gpus=1),
     dict(device="cuda:0")),
    ("mps", {}, Hardware(mps=True), dict(device="mps", backend="gloo")),
    ("xla", {"PJRT_DEVICE": "CPU"}, Hardware(xla=True),
     dict(device="xla", backend="xla", strategy=dl.XLA())),
    ("xla asked but missing", {"PJRT_DEVICE": "TPU"}, CPU, dict(device="cpu")),
    ("xmp replica", {"PJRT_DEVICE": "CPU", "PJRT_LOCAL_PROCESS_COUNT": "1",
                     "PJRT_LOCAL_PROCESS_RANK": "0"},
     Hardware(xla=True, xla_replica=(1, 2, 1, 2, 0, 1)),
     dict(rank=1, world_size=2, local_rank=1, local_world_size=2, launcher="xmp",
          device="xla", backend="xla", strategy=dl.XLA())),
    ("xla spmd", {"PJRT_DEVICE": "TPU", "XLA_USE_SPMD": "1"}, Hardware(xla=True),
     dict(world_size=1, device="xla", strategy=dl.XLA(spmd=True))),
    ("torchrun wins over xmp", {**TORCHRUN, "PJRT_DEVICE": "TPU",
                                "PJRT_LOCAL_PROCESS_COUNT": "1"}, Hardware(xla=True),
     dict(rank=3, launcher="torchrun", backend="xla")),
    ("debug and timeout", {"DISTLIB_DEBUG": "yes", "DISTLIB_TIMEOUT": "60"}, CPU,
     dict(debug=True, timeout_s=60.0)),
]


@pytest.mark.parametrize(("name", "environ", "hardware", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_detect(name: str, environ: dict[str, str], hardware: Hardware,
                expected: dict[str, object]) -> None:
    env = detect(environ, hardware=hardware)
    got = {k: getattr(env, k) for k in expected}
    assert got == expected


def test_detect_precedence_explicit_over_variables_over_config() -> None:
    environ = {"DISTLIB_PRECISION": "fp16", "DISTLIB_STRATEGY": "ddp"}
    config = {"precision": "bf16", "strategy": "deepspeed", "strategy_options": {"zero_stage": 3}}
    assert detect({}, config=config, hardware=CPU).strategy == dl.DeepSpeed(zero_stage=3)
    assert detect({}, config=config, hardware=CPU).precision == "bf16"
    assert detect(environ, config=config, hardware=CPU).precision == "fp16"
    assert detect(environ, config=config, hardware=CPU).strategy == dl.DDP()
    explicit = detect(environ, config=config, hardware=CPU, precision="no", strategy=dl.FSDP())
    assert (explicit.precision, explicit.strategy) == (dl.Precision.NO, dl.FSDP())


def test_detect_reads_only_the_given_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert detect({}, hardware=CPU).world_size == 1
    assert detect(hardware=CPU).world_size == 2  # None means os.environ


def test_several_envs_coexist_and_replace_revalidates() -> None:
    envs = [Env(rank=r, world_size=8, local_rank=r % 4, local_world_size=4, node_rank=r // 4,
                num_nodes=2) for r in range(8)]
    assert [e.rank for e in envs] == list(range(8))
    assert envs[0].is_main and not envs[3].is_main and envs[4].is_local_main
    assert envs[0].is_distributed and not Env().is_distributed
    moved = dataclasses.replace(envs[3], device="cuda:1")
    assert moved.device == "cuda:1" and envs[3].device == "cpu"
    with pytest.raises(EnvError, match="rank must be in"):
        dataclasses.replace(envs[3], rank=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        envs[0].rank = 1  # type: ignore[misc]
    assert hash(envs[0]) == hash(Env(rank=0, world_size=8, local_world_size=4, num_nodes=2))


def test_env_accepts_plain_strings_for_policies() -> None:
    env = Env(precision="bf16", strategy="fsdp")
    assert env.precision is dl.Precision.BF16 and env.strategy == dl.FSDP()
    assert "rank=0" in repr(env) and "strategy=FSDP(" in repr(env)


# variables, expected error type, text the message must contain
BAD = [
    ({"RANK": "one", "WORLD_SIZE": "2"}, EnvError, "RANK must be an integer, but got RANK='one'"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, EnvError,
     "RANK must be in [0, WORLD_SIZE), but got RANK='4', WORLD_SIZE='4'"),
    ({"RANK": "-1", "WORLD_SIZE": "4"}, EnvError, "RANK must be >= 0, but got RANK='-1'"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, EnvError, "WORLD_SIZE must be >= 1"),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, EnvError,
     "LOCAL_RANK must be in [0, LOCAL_WORLD_SIZE), but got LOCAL_RANK='2', LOCAL_WORLD_SIZE='2'"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "4"}, EnvError,
     "LOCAL_WORLD_SIZE must be <= WORLD_SIZE"),
    ({"MASTER_PORT": "70000"}, EnvError, "MASTER_PORT must be in 1..65535, but got MASTER_PORT='70000'"),
    ({"MASTER_PORT": "0"}, EnvError, "MASTER_PORT must be in 1..65535"),
    ({"MASTER_PORT": "http"}, EnvError, "MASTER_PORT must be an integer, but got MASTER_PORT='http'"),
    ({"DISTLIB_PRECISION": "fp12"}, PrecisionError, "DISTLIB_PRECISION must be one of"),
    ({"DISTLIB_STRATEGY": "zero"}, ConfigError, "must be one of 'single', 'ddp'"),
    ({"DISTLIB_STRATEGY": "ddp", "DISTLIB_STRATEGY_OPTIONS": "[1]"}, EnvError,
     "DISTLIB_STRATEGY_OPTIONS must be a JSON object"),
    ({"DISTLIB_STRATEGY": "ddp", "DISTLIB_STRATEGY_OPTIONS": '{"zero_stage": 3}'}, ConfigError,
     "'zero_stage' do not exist for strategy 'ddp'"),
    ({"DISTLIB_CPU": "maybe"}, EnvError, "DISTLIB_CPU must be one of"),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"}, EnvError,
     "OMPI_COMM_WORLD_RANK must be in [0, OMPI_COMM_WORLD_SIZE)"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
      "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NODELIST": "gpu[01-02"}, EnvError,
     "SLURM_JOB_NODELIST must be a SLURM host list"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2(3)"}, EnvError,
     "SLURM_TASKS_PER_NODE must look like"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, EnvError, "MASTER_ADDR must be set"),
]


@pytest.mark.parametrize(("environ", "error", "text"), BAD, ids=[t for *_, t in BAD])
def test_detect_rejects_bad_input(environ: dict[str, str], error: type[Exception],
                                  text: str) -> None:
    with pytest.raises(error) as info:
        detect(environ, hardware=CPU)
    assert text in str(info.value)
    assert isinstance(info.value, ValueError)  # plain `except ValueError` keeps working


BAD_FIELDS = [
    (dict(rank=2, world_size=2), "Env(): rank must be in [0, world_size), but got rank=2"),
    (dict(world_size=True), "world_size must be an int"),
    (dict(master_port=0), "master_port must be in 1..65535"),
    (dict(backend="tcp"), "backend must be one of 'gloo', 'nccl'"),
    (dict(device="gpu0"), "device must look like"),
    (dict(timeout_s=0), "timeout_s must be > 0"),
    (dict(node_rank=1), "node_rank must be in [0, num_nodes)"),
]


@pytest.mark.parametrize(("fields", "text"), BAD_FIELDS, ids=[t for _, t in BAD_FIELDS])
def test_env_rejects_bad_fields(fields: dict[str, object], text: str) -> None:
    with pytest.raises(EnvError) as info:
        Env(**fields)  # type: ignore[arg-type]
    assert text in str(info.value)


def test_bad_precision_field_names_choices() -> None:
    with pytest.raises(PrecisionError, match="'no', 'fp16', 'bf16', 'fp8'"):
        Env(precision="int4")


@pytest.mark.parametrize(("cpu", "environ", "config", "device"), [
    (False, {"DISTLIB_CPU": "1"}, None, "cpu"),      # cpu=False does not undo the launcher's --cpu
    (None, {"DISTLIB_CPU": "1"}, None, "cpu"),
    (False, {}, {"cpu": True}, "cpu"),               # ... nor a config file's cpu: true
    (False, {}, None, "cuda:0"),                     # not forced: the hardware decides
    (None, {}, None, "cuda:0"),
    (True, {}, None, "cpu"),                         # only True forces
    (True, {"DISTLIB_CPU": "0"}, None, "cpu"),
])
def test_detect_cpu_false_means_not_forced(cpu: bool | None, environ: dict[str, str],
                                           config: dict[str, bool] | None, device: str) -> None:
    assert detect(environ, config=config, cpu=cpu, hardware=TWO_GPUS).device == device


# Every way a variable can make detect() fail: (environ, the variable blamed, its value).
# The message must name the variable and quote the value as it was set.
T = {"RANK": "0", "WORLD_SIZE": "2"}
VARIABLE_ERRORS = [
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK", "one"),
    ({"RANK": "0", "WORLD_SIZE": "2x"}, "WORLD_SIZE", "2x"),
    ({**T, "LOCAL_RANK": "-1"}, "LOCAL_RANK", "-1"),
    ({**T, "LOCAL_RANK": "3"}, "LOCAL_RANK", "3"),  # LOCAL_WORLD_SIZE unset: from WORLD_SIZE
    ({**T, "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE", "0"),
    ({**T, "LOCAL_WORLD_SIZE": "4"}, "LOCAL_WORLD_SIZE", "4"),
    ({**T, "GROUP_RANK": "2", "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "GROUP_RANK", "2"),
    ({**T, "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "x"}, "GROUP_WORLD_SIZE", "x"),
    ({**T, "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "2"}, "GROUP_WORLD_SIZE", "2"),  # no addr
    ({"RANK": "5", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "4",
      "MASTER_ADDR": "h"}, "RANK", "5"),
    ({**T, "MASTER_ADDR": " "}, "MASTER_ADDR", " "),
    ({**T, "MASTER_PORT": "http"}, "MASTER_PORT", "http"),
    ({**T, "MASTER_PORT": "70000"}, "MASTER_PORT", "70000"),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK", "2"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "0"}, "OMPI_COMM_WORLD_SIZE", "0"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
      "OMPI_COMM_WORLD_LOCAL_RANK": "5"}, "OMPI_COMM_WORLD_LOCAL_RANK", "5"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "y"}, "OMPI_COMM_WORLD_LOCAL_SIZE", "y"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE":
      "1", "OMPI_COMM_WORLD_NODE_RANK": "7", "MASTER_ADDR": "h"}, "OMPI_COMM_WORLD_NODE_RANK",
     "7"),
    ({"PMI_RANK": "z", "PMI_SIZE": "2"}, "PMI_RANK", "z"),
    ({"PMI_RANK": "0", "PMI_SIZE": "-2"}, "PMI_SIZE", "-2"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "2"}, "MPI_LOCALRANKID", "2"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "4"}, "MPI_LOCALNRANKS", "4"),
    ({"MV2_COMM_WORLD_RANK": "9", "MV2_COMM_WORLD_SIZE": "2"}, "MV2_COMM_WORLD_RANK", "9"),
    ({"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "a"}, "MV2_COMM_WORLD_SIZE", "a"),
    ({"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_LOCAL_RANK": "2"},
     "MV2_COMM_WORLD_LOCAL_RANK", "2"),
    ({"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_LOCAL_SIZE": "3"},
     "MV2_COMM_WORLD_LOCAL_SIZE", "3"),
    ({"SLURM_PROCID": "p", "SLURM_NTASKS": "2"}, "SLURM_PROCID", "p"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, "SLURM_NTASKS", "0"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "2"}, "SLURM_LOCALID", "2"),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3", "SLURM_NODEID": "1",
      "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "a[1-2]"},
     "SLURM_TASKS_PER_NODE", "2(x2)"),  # the local rank is checked against the per-node count
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "two"},
     "SLURM_NTASKS_PER_NODE", "two"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "2", "SLURM_NNODES": "2",
      "SLURM_JOB_NODELIST": "a[1-2]"}, "SLURM_NODEID", "2"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "n"}, "SLURM_NNODES", "n"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
      "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NODELIST": "gpu[01-02"},
     "SLURM_JOB_NODELIST", "gpu[01-02"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
      "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_NODELIST": "a,,b"}, "SLURM_NODELIST", "a,,b"),
    ({"DISTLIB_PRECISION": "fp64"}, "DISTLIB_PRECISION", "fp64"),
    ({"DISTLIB_STRATEGY": "zero"}, "DISTLIB_STRATEGY", "zero"),
    ({"DISTLIB_STRATEGY": "ddp", "DISTLIB_STRATEGY_OPTIONS": "[1]"},
     "DISTLIB_STRATEGY_OPTIONS", "[1]"),
    ({"DISTLIB_STRATEGY": "deepspeed", "DISTLIB_STRATEGY_OPTIONS": '{"zero_stag": 3}'},
     "DISTLIB_STRATEGY_OPTIONS", '{"zero_stag": 3}'),
    ({"DISTLIB_STRATEGY": "deepspeed", "DISTLIB_STRATEGY_OPTIONS": '{"zero_stage": 9}'},
     "DISTLIB_STRATEGY_OPTIONS", '{"zero_stage": 9}'),
    ({"DISTLIB_CPU": "maybe"}, "DISTLIB_CPU", "maybe"),
    ({"DISTLIB_DEBUG": "2"}, "DISTLIB_DEBUG", "2"),
    ({"DISTLIB_CHECK_COLLECTIVES": "sometimes"}, "DISTLIB_CHECK_COLLECTIVES", "sometimes"),
    ({"DISTLIB_TIMEOUT": "soon"}, "DISTLIB_TIMEOUT", "soon"),
    ({"DISTLIB_TIMEOUT": "0"}, "DISTLIB_TIMEOUT", "0"),
    ({"DISTLIB_TIMEOUT": "-30"}, "DISTLIB_TIMEOUT", "-30"),
    ({"DISTLIB_TIMEOUT": "inf"}, "DISTLIB_TIMEOUT", "inf"),
    ({"TORCHELASTIC_RESTART_COUNT": "-1"}, "TORCHELASTIC_RESTART_COUNT", "-1"),
    ({"TORCHELASTIC_RESTART_COUNT": "again"}, "TORCHELASTIC_RESTART_COUNT", "again"),
    ({"TORCHELASTIC_USE_AGENT_STORE": "perhaps"}, "TORCHELASTIC_USE_AGENT_STORE", "perhaps"),
    ({"PJRT_DEVICE": "TPU", "XLA_USE_SPMD": "maybe"}, "XLA_USE_SPMD", "maybe"),
    ({**T, "DISTLIB_MESH": "tp=3"}, "DISTLIB_MESH", "tp=3"),  # 3 does not divide 2 ranks
    ({**T, "DISTLIB_MESH": "dp_shard=1,tp=1"}, "DISTLIB_MESH", "dp_shard=1,tp=1"),  # 1 != 2
    ({**T, "DISTLIB_MESH": "tensor=2"}, "DISTLIB_MESH", "tensor=2"),
    ({**T, "DISTLIB_MESH": "tp:2"}, "DISTLIB_MESH", "tp:2"),
    ({**T, "DISTLIB_MESH": "tp=0"}, "DISTLIB_MESH", "tp=0"),
    ({**T, "DISTLIB_MESH": "tp=2,tp=2"}, "DISTLIB_MESH", "tp=2,tp=2"),
    ({**T, "DISTLIB_MESH": "tp=-1,cp=-1"}, "DISTLIB_MESH", "tp=-1,cp=-1"),
]
# Variables any value of which is valid (never an error, so no case above).
FREE_FORM = {
    "DISTLIB_LAUNCHED": "'1' means distlib's launcher; anything else means torchrun",
    "PJRT_DEVICE": "any non-empty value selects XLA when torch_xla is installed",
    "PJRT_LOCAL_PROCESS_COUNT": "only its presence is read (an xmp.spawn replica)",
    "SLURM_JOB_ID": "a non-numeric id leaves the default port",
    "SLURM_JOBID": "a non-numeric id leaves the default port",
}


class _Recording(dict):  # type: ignore[type-arg]
    """A mapping that remembers every name detect() looks up."""

    def __init__(self, data: dict[str, str], seen: set[str]) -> None:
        super().__init__(data)
        self.seen = seen

    def __getitem__(self, key: str) -> str:
        self.seen.add(key)
        return str(super().__getitem__(key))

    def __contains__(self, key: object) -> bool:
        self.seen.add(str(key))
        return super().__contains__(key)

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.seen.add(key)
        return super().get(key, default)


@pytest.mark.parametrize(("environ", "variable", "value"), VARIABLE_ERRORS,
                         ids=[f"{v}={x!r}" for _, v, x in VARIABLE_ERRORS])
def test_every_detect_error_names_its_variable_and_quotes_its_value(
        environ: dict[str, str], variable: str, value: str) -> None:
    hardware = Hardware(xla=True) if "PJRT_DEVICE" in environ else CPU
    with pytest.raises(ValueError) as info:
        detect(environ, hardware=hardware)
    message = str(info.value)
    assert isinstance(info.value, DistlibError), message
    assert message.startswith("detect(): "), message
    assert variable in message and repr(value) in message, message
    assert "Env()" not in message  # never blames a field the user did not write


def test_the_error_cases_cover_every_variable_detect_reads() -> None:
    """Adding a variable to detect() without a bad-value case above fails here."""
    seen: set[str] = set()
    every = {**TORCHRUN, **OPENMPI, **INTELMPI, **MVAPICH, **SLURM,
             "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODELIST": "a", "SLURM_JOBID": "1",
             "DISTLIB_LAUNCHED": "1", "DISTLIB_PRECISION": "bf16", "DISTLIB_STRATEGY": "ddp",
             "DISTLIB_STRATEGY_OPTIONS": "{}", "DISTLIB_CPU": "0", "DISTLIB_DEBUG": "0",
             "DISTLIB_CHECK_COLLECTIVES": "1", "DISTLIB_TIMEOUT": "60",
             "PJRT_DEVICE": "TPU", "PJRT_LOCAL_PROCESS_COUNT": "1", "XLA_USE_SPMD": "0"}
    launchers = (TORCHRUN, OPENMPI, INTELMPI, MVAPICH, SLURM)
    for ranks in launchers:  # each launcher alone, with every other variable distlib reads
        others = {k: v for k, v in every.items()
                  if not any(k in table for table in launchers if table is not ranks)}
        detect(_Recording({**others, **ranks}, seen), hardware=Hardware(xla=True))
        detect(_Recording({k: v for k, v in others.items() if k != "PJRT_DEVICE"} | ranks,
                          seen), hardware=CPU)
    detect(_Recording({"PJRT_DEVICE": "TPU", "PJRT_LOCAL_PROCESS_COUNT": "1"}, seen),
           hardware=Hardware(xla=True, xla_replica=(0, 1, 0, 1, 0, 1)))
    covered = {variable for _, variable, _ in VARIABLE_ERRORS}
    missing = sorted(seen - covered - set(FREE_FORM))
    assert not missing, f"detect() reads {missing} but no case above makes them fail"


# ---- the mesh: explicit > DISTLIB_MESH > config > all data parallel -----------------------

FOUR = {"RANK": "3", "WORLD_SIZE": "4", "DISTLIB_LAUNCHED": "1"}


def test_the_default_mesh_is_all_data_parallel() -> None:
    assert detect(FOUR, hardware=CPU).mesh == dl.Mesh(dp_shard=4)
    assert detect({}, hardware=CPU).mesh == dl.Mesh(dp_shard=1)


def test_the_launchers_mesh_variable_is_read_and_resolved() -> None:
    env = detect(FOUR | {"DISTLIB_MESH": "dp_replicate=1,dp_shard=2,cp=1,tp=2"}, hardware=CPU)
    assert env.mesh == dl.Mesh(dp_replicate=1, dp_shard=2, cp=1, tp=2)
    assert env.mesh.coordinates(3) == {"dp_replicate": 0, "dp_shard": 1, "cp": 0, "tp": 1}
    assert detect(FOUR | {"DISTLIB_MESH": "tp=2"}, hardware=CPU).mesh == dl.Mesh(dp_shard=2, tp=2)
    inferred = detect(FOUR | {"DISTLIB_MESH": "dp_replicate=-1,dp_shard=1,tp=2"}, hardware=CPU)
    assert inferred.mesh == dl.Mesh(dp_replicate=2, dp_shard=1, tp=2)
    assert detect(FOUR | {"DISTLIB_MESH": " "}, hardware=CPU).mesh == dl.Mesh(dp_shard=4)


def test_mesh_precedence_explicit_over_variable_over_config() -> None:
    config = {"mesh": {"dp_replicate": 2, "tp": 2}}
    assert detect(FOUR, config=config, hardware=CPU).mesh == dl.Mesh(dp_replicate=2, dp_shard=1,
                                                                     tp=2)
    variable = FOUR | {"DISTLIB_MESH": "cp=2"}
    assert detect(variable, config=config, hardware=CPU).mesh == dl.Mesh(dp_shard=2, cp=2)
    assert detect(variable, config=config, hardware=CPU, mesh="tp=4").mesh == dl.Mesh(
        dp_shard=1, tp=4)
    assert detect(variable, hardware=CPU, mesh=dl.Mesh(dp_replicate=4, dp_shard=1)).mesh == (
        dl.Mesh(dp_replicate=4, dp_shard=1))


@pytest.mark.parametrize("config", [{"mesh": "tp=2"}, {"mesh": {"tp": 2}},
                                    {"mesh": dl.Mesh(tp=2)}, {"tp_size": 2},
                                    {"tp_size": 2, "dp_replicate_size": 1, "cp_size": None}])
def test_the_config_names_the_mesh_in_any_spelling(config: dict[str, object]) -> None:
    assert detect(FOUR, config=config, hardware=CPU).mesh == dl.Mesh(dp_shard=2, tp=2)


@pytest.mark.parametrize(("config", "words"), [
    ({"mesh": "tp=3"}, ["world size 4", "tp=3"]),
    ({"mesh": {"tensor": 2}}, ["config: mesh", "['tensor']"]),
    ({"mesh": {"tp": 0}}, ["config: mesh", "tp", "0"]),
    ({"mesh": 4}, ["config: mesh", "4"]),
    ({"mesh": "tp=2", "tp_size": 2}, ["once", "tp_size=2"]),
    ({"tp_size": 3}, ["world size 4"]),
    ({"mesh_size": 2}, ["'mesh_size'", "'tp_size'"]),
])
def test_bad_config_meshes_name_the_key_and_the_value(config: dict[str, object],
                                                      words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        detect(FOUR, config=config, hardware=CPU)
    assert str(info.value).startswith(("detect(): ", "config: mesh")), info.value
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_an_explicit_mesh_that_does_not_fit_names_the_argument() -> None:
    with pytest.raises(ConfigError, match=r"detect\(\): .*mesh='tp=8'.*world size 4"):
        detect(FOUR, hardware=CPU, mesh="tp=8")
    with pytest.raises(ConfigError, match="detect\\(\\): mesh must be AXIS=SIZE pairs"):
        detect(FOUR, hardware=CPU, mesh="tp")


def test_a_tensor_or_context_parallel_mesh_defaults_to_fsdp() -> None:
    """DDP cannot hold tensor-parallel DTensors: with no strategy named, a tp/cp mesh picks FSDP2."""
    base = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert dl.detect(base | {"DISTLIB_MESH": "tp=2"}).strategy.name == "fsdp"
    assert dl.detect(base | {"DISTLIB_MESH": "cp=2"}).strategy.name == "fsdp"
    assert dl.detect(base | {"DISTLIB_MESH": "dp_replicate=2"}).strategy.name == "ddp"
    assert dl.detect(base).strategy.name == "ddp"
    assert dl.detect(base | {"DISTLIB_MESH": "tp=2", "DISTLIB_STRATEGY": "ddp"}).strategy.name == "ddp"
