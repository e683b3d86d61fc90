"""Config files (`--config`, `--print-config`) and grouped `--help` of swarm-peer and swarm-bootstrap.

Most tests drive the click commands in-process with `--print-config`, which exits before anything starts; one runs
the real program in a subprocess, as a volunteer would.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from bootstrap.cli import main as bootstrap_main
from peers.cli import build_config
from peers.cli import main as peer_main
from peers.config import tomllib  # tomli before Python 3.11

SOME_PEER_ID = "12D3KooWP1b7pVH65mtCj9V4pGaKKoQZMFpMSu3a7njTJpbXk4Aq"
A = f"/ip4/10.0.0.1/tcp/4001/p2p/{SOME_PEER_ID}"
B = f"/ip4/10.0.0.2/tcp/4001/p2p/{SOME_PEER_ID}"
C = f"/ip4/10.0.0.3/tcp/4001/p2p/{SOME_PEER_ID}"


def peer(*args: str, command=peer_main):
    return CliRunner().invoke(command, list(args), prog_name="swarm-peer")


def printed(*args: str, command=peer_main) -> str:
    """What `--print-config` prints with these flags (always added: the command must never start a node here)."""
    result = peer(*args, "--print-config", command=command)
    assert result.exit_code == 0, result.output
    return result.stdout


def help_text(command=peer_main) -> str:
    result = peer("--help", command=command)
    assert result.exit_code == 0, result.output
    return result.stdout


def peer_config(*args: str):
    """The PeerConfig swarm-peer would run with these flags."""
    ctx = peer_main.make_context("swarm-peer", list(args))
    flags = dict(ctx.params)
    flags.pop("print_config")
    return build_config(flags)


def write(tmp_path, text: str, name: str = "peer.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.timeout(60)
def test_flags_on_the_command_line_win_over_the_file(tmp_path):
    path = write(
        tmp_path,
        f"""
seq-len = 64                      # a flat key loads as well as one in its group's table
[network]
run-id = "from-file"
initial-peers = ["{A}", "{B}"]
direct = false
[training]
inner-steps = 30
lr = 0.01
""",
    )
    out = tomllib.loads(printed("--config", path, "--inner-steps", "7", "--initial-peers", C, "--direct"))
    assert out["training"]["inner-steps"] == 7  # flag beats file
    assert out["network"]["initial-peers"] == [C]  # a repeated flag replaces the file's array, not appends
    assert out["network"]["direct"] is True
    assert out["training"]["lr"] == 0.01  # file beats default
    assert out["network"]["run-id"] == "from-file"
    assert out["training"]["seq-len"] == 64
    assert out["training"]["batch-size"] == 8  # neither: the default

    config = peer_config("--config", path, "--inner-steps", "7")
    assert (config.inner_steps, config.inner.lr, config.seq_len) == (7, 0.01, 64)
    assert config.swarm.run_id == "from-file" and config.swarm.direct_data_plane is False
    assert config.node.initial_peers == [A, B]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "text, expected",
    [
        ("inner-stepz = 3\n", ["unknown key 'inner-stepz'", "did you mean 'inner-steps'"]),
        ("inner_steps = 3\n", ["unknown key 'inner_steps'", "did you mean 'inner-steps'"]),
        ("[training]\nwarp-drive = true\n", ["unknown key 'warp-drive'", "[training]"]),
        ("[telemetry]\nport = 1\n", ["unknown key 'telemetry'"]),
        ("config = 'other.toml'\n", ["unknown key 'config'"]),
        ("[network]\ninner-steps = 3\n", ["'inner-steps'", "belongs in [training]"]),
        ("inner-steps = 3\n[training]\ninner-steps = 4\n", ["'inner-steps' is given twice"]),
        ("inner-steps = [3\n", ["not a readable TOML file"]),
    ],
)
def test_a_bad_key_in_the_file_is_an_error_naming_it_and_the_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    result = peer("--config", path, "--print-config")
    assert result.exit_code == 2, result.output
    assert "--config" in result.output and path in result.output
    for part in expected:
        assert part in result.output
    assert result.stdout == ""  # nothing printed as a configuration


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "text, flag",
    [
        ('[training]\ninner-steps = "many"\n', "--inner-steps"),
        ("[training]\ninner-steps = 0\n", "--inner-steps"),
        ("[training]\ninner-steps = 2.5\n", "--inner-steps"),  # click would truncate it to 2
        ("[training]\nbatch-size = true\n", "--batch-size"),  # click would take it as 1
        ("[training]\nlr = [0.1]\n", "--lr"),
        ('[network]\ndirect = "no"\n', "--direct"),
        ('[network]\ncompression = "int3"\n', "--compression"),
        ("[observability]\ndashboard-port = 70000\n", "--dashboard-port"),
        ("[network]\nmatchmaking-timeout = { seconds = 3 }\n", "--matchmaking-timeout"),
    ],
)
def test_a_bad_value_in_the_file_names_the_flag_and_the_file(tmp_path, text, flag):
    path = write(tmp_path, text)
    result = peer("--config", path, "--print-config")
    assert result.exit_code == 2, result.output
    assert f"'{flag}'" in result.output and path in result.output


@pytest.mark.timeout(60)
def test_combinations_the_program_refuses_are_refused_by_print_config_too(tmp_path):
    path = write(tmp_path, f'[network]\nmin-group-size = 3\nmax-group-size = 2\ninitial-peers = ["{A}"]\n')
    result = peer("--config", path, "--print-config")
    assert result.exit_code == 2 and "'--max-group-size'" in result.output
    path = write(tmp_path, '[network]\ninitial-peers = ["/ip4/127.0.0.1/tcp/4000"]\n')
    result = peer("--config", path, "--print-config")
    assert result.exit_code == 2 and "'--initial-peers'" in result.output and "/p2p/" in result.output


ROUND_TRIP_FLAGS = [
    "--initial-peers", A, "--initial-peers", B, "--run-id", "round-trip", "--announce-maddrs", "/ip4/1.2.3.4/tcp/31337",
    "--no-direct", "--error-feedback", "--progress", "--lr", "3e-4", "--decay-steps", "500", "--warmup-steps", "20",
    "--outer-momentum", "0.95", "--max-group-size", "4", "--compression", "fp16", "--identity", 'key "q" \\ é.id',
    "--checkpoint-dir", "ckpt dir", "--metrics-file", "m.jsonl", "--eval-dataset", "none", "--eval-every", "3",
    "--dashboard-port", "8080", "--dashboard-host", "0.0.0.0", "--prometheus-port", "9100", "--log-level", "DEBUG",
]  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [[], ROUND_TRIP_FLAGS], ids=["defaults", "many-flags"])
def test_print_config_round_trips(tmp_path, args):
    first = printed(*args)
    path = write(tmp_path, first)
    assert printed("--config", path) == first
    assert peer_config("--config", path) == peer_config(*args)
    loaded = tomllib.loads(first)
    assert set(loaded) <= {"network", "training", "data", "observability", "checkpoints"}
    if not args:
        # Unset flags (None) are left out, since TOML has no null, and come back as the same None.
        assert "decay-steps" not in loaded["training"] and "progress" not in loaded["observability"]
        assert "checkpoints" not in loaded
        config = peer_config("--config", path)
        assert config.inner.decay_steps is None and config.progress is None and config.checkpoint_dir is None
    else:
        assert loaded["network"]["initial-peers"] == [A, B] and loaded["network"]["direct"] is False
        assert loaded["checkpoints"]["checkpoint-dir"] == "ckpt dir"
        assert loaded["network"]["identity"] == 'key "q" \\ é.id'


@pytest.mark.timeout(60)
def test_print_config_of_the_real_program_loads_back(tmp_path):
    code = "import sys; from peers.cli import main; sys.argv[0] = 'swarm-peer'; main()"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=50, stdin=subprocess.DEVNULL
        )

    first = run("--inner-steps", "12", "--eval-batches", "2", "--print-config")
    assert first.returncode == 0, first.stderr
    assert "others can join through" not in first.stderr  # it printed and exited; no node was started
    path = write(tmp_path, first.stdout)
    again = run("--config", path, "--print-config")
    assert again.returncode == 0 and again.stdout == first.stdout
    bad = run("--config", write(tmp_path, "inner-stepz = 3\n", "bad.toml"), "--print-config")
    assert bad.returncode == 2 and "unknown key 'inner-stepz'" in bad.stderr


@pytest.mark.timeout(60)
def test_new_flags_map_into_the_peer_config():
    config = peer_config()
    assert config.eval.dataset == "embedded" and config.eval.every_outer_steps == 1 and config.eval.batches == 4
    assert config.monitor.dashboard_port is None and config.monitor.prometheus_port is None
    assert config.monitor.dashboard_host == config.monitor.prometheus_host == "127.0.0.1"
    config = peer_config("--eval-dataset", "none", "--eval-every", "5", "--eval-batches", "2", "--dashboard-port",
                         "8080", "--dashboard-host", "0.0.0.0", "--prometheus-port", "9100")  # fmt: skip
    assert config.eval.dataset is None and config.eval.every_outer_steps == 5 and config.eval.batches == 2
    assert (config.monitor.dashboard_port, config.monitor.dashboard_host) == (8080, "0.0.0.0")
    assert (config.monitor.prometheus_port, config.monitor.prometheus_host) == (9100, "127.0.0.1")
    for args, flag in [(["--eval-every", "0"], "--eval-every"), (["--eval-batches", "0"], "--eval-batches"),
                       (["--dashboard-port", "0"], "--dashboard-port"), (["--prometheus-port", "65536"],
                       "--prometheus-port")]:  # fmt: skip
        result = peer(*args, "--print-config")
        assert result.exit_code == 2 and f"'{flag}'" in result.output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [peer_main, bootstrap_main], ids=["swarm-peer", "swarm-bootstrap"])
def test_one_port_for_dashboard_and_prometheus_is_a_usage_error(tmp_path, command):
    result = peer("--dashboard-port", "9000", "--prometheus-port", "9000", "--print-config", command=command)
    assert result.exit_code == 2
    assert "'--prometheus-port'" in result.output and "--dashboard-port" in result.output
    path = write(tmp_path, "[observability]\ndashboard-port = 9000\n")
    result = peer("--config", path, "--prometheus-port", "9000", "--print-config", command=command)
    assert result.exit_code == 2 and "'--prometheus-port'" in result.output
    assert "prometheus-port = 9001" in printed("--config", path, "--prometheus-port", "9001",
                                               command=command)  # fmt: skip


def sections_of(help_text: str) -> dict[str, str]:
    """Help text by section heading ("Network:" ...), each section's text up to the next heading."""
    sections, current = {}, None
    for line in help_text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


@pytest.mark.timeout(60)
def test_help_groups_the_flags():
    sections = sections_of(help_text())
    assert list(sections) == ["Configuration", "Network", "Training", "Data", "Observability", "Checkpoints"]
    expected = {
        "Configuration": ["--config FILE.toml", "--print-config", "--help"],
        "Network": ["--initial-peers", "--run-id", "--host-maddrs", "--matchmaking-timeout", "--direct / --no-direct"],
        "Training": ["--inner-steps", "--lr", "--outer-momentum", "--model", "--nproc-per-node"],
        "Data": ["--dataset", "--eval-dataset"],
        "Observability": ["--metrics-file", "--eval-every", "--eval-batches", "--dashboard-port", "--prometheus-host"],
        "Checkpoints": ["--checkpoint-dir"],
    }
    for title, flags in expected.items():
        for flag in flags:
            assert flag in sections[title], (title, flag)
    assert "--inner-steps" not in sections["Network"] and "--dataset" not in sections["Training"]

    boot = sections_of(help_text(bootstrap_main))
    assert list(boot) == ["Configuration", "Network", "Observability"]
    assert "--identity" in boot["Network"] and "--health-interval" in boot["Observability"]
    assert "--dashboard-port" in boot["Observability"] and "--config" in boot["Configuration"]


@pytest.mark.timeout(60)
def test_bootstrap_config_round_trips_and_refuses_unknown_keys(tmp_path):
    first = printed("--run-id", "a", "--run-id", "b", "--prometheus-port", "9100",
                    command=bootstrap_main)  # fmt: skip
    loaded = tomllib.loads(first)
    assert loaded["observability"]["run-id"] == ["a", "b"] and loaded["network"]["identity"] == "bootstrap.id"
    path = write(tmp_path, first, "bootstrap.toml")
    assert printed("--config", path, command=bootstrap_main) == first
    assert 'run-id = ["c"]' in printed("--config", path, "--run-id", "c", command=bootstrap_main)
    wrong = write(tmp_path, "inner-steps = 3\n", "wrong.toml")
    result = peer("--config", wrong, "--print-config", command=bootstrap_main)
    assert result.exit_code == 2 and "unknown key 'inner-steps'" in result.output
