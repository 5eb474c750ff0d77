"""What the agent leaves unimported until it needs it: asyncio behind structlog's async
methods (replicator.logs) and prometheus-client until metrics are served
(replicas.instruments). Each check runs in a fresh interpreter: the test process has long
imported both."""

from __future__ import annotations

import subprocess
import sys

from harness import ROOT, env


def run(code: str) -> list[str]:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_structlog_comes_without_asyncio_and_its_async_methods_still_work():
    out = run(
        "import sys, io\n"
        "from replicator import logs\n"
        "print('asyncio' in sys.modules, 'ssl' in sys.modules)\n"
        "stream = io.StringIO(); logs.configure('info', 'json', stream)\n"
        "logs.get(db='x').info('sync')\n"
        "import asyncio\n"  # an ordinary import after structlog's: the real module
        "print(hasattr(asyncio, 'run') and sys.modules['asyncio'] is asyncio)\n"
        "async def main():\n"
        "    await logs.get(db='y').ainfo('async')\n"  # structlog's stand-in resolves to the real asyncio
        "asyncio.run(main())\n"
        "print(stream.getvalue().count('\"event\": \"sync\"'), stream.getvalue().count('\"event\": \"async\"'))\n"
    )
    assert out == ["False", "False", "True", "1", "1"]


def test_a_stand_in_read_during_structlogs_import_loads_the_real_asyncio():
    # if structlog ever reads an attribute of asyncio as it is imported, the stand-in must
    # give way to the real module rather than recurse
    out = run(
        "import sys, types\n"
        "from replicator import logs\n"
        "stand_in = logs.structlog._native.asyncio\n"
        "print(type(stand_in) is types.ModuleType, 'asyncio' in sys.modules)\n"
        "print(stand_in.get_running_loop is sys.modules['asyncio'].get_running_loop)\n"
    )
    assert out == ["True", "False", "True"]


def test_instruments_count_nothing_and_import_nothing_until_enabled():
    out = run(
        "import sys\n"
        "from replicas import instruments\n"
        "from replicator import metrics\n"
        "child = metrics.ROTATIONS.labels(db='a', reason='initial'); child.inc()\n"
        "metrics.SNAPSHOT_SECONDS.labels(db='a').observe(0.5)\n"
        "print('prometheus_client' in sys.modules, child is instruments.INERT, instruments.enabled())\n"
        "instruments.enable(); instruments.enable()\n"  # idempotent
        "from prometheus_client import REGISTRY\n"
        "metrics.ROTATIONS.labels(db='a', reason='initial').inc()\n"
        "metrics.SNAPSHOT_SECONDS.labels(db='a').observe(0.5)\n"
        "child.inc()\n"  # a child taken before enable() stays inert
        "late = instruments.Counter('replicator_test_late_total', 'Declared after enable().', ['db'])\n"
        "late.labels(db='a').inc(3)\n"
        "v = REGISTRY.get_sample_value\n"
        "print(v('replicator_generation_rotations_total', {'db': 'a', 'reason': 'initial'}),\n"
        "      v('replicator_snapshot_seconds_count', {'db': 'a'}), v('replicator_snapshot_seconds_bucket', {'db': 'a', 'le': '0.5'}),\n"
        "      v('replicator_test_late_total', {'db': 'a'}))\n"
    )
    assert out == ["False", "True", "False", "1.0", "1.0", "1.0", "3.0"]


def test_replica_drivers_are_measured_only_once_metrics_count():
    out = run(
        "from replicas import instruments\n"
        "from replicas.metrics import MetricsDriver\n"
        "from replicator.config import ReplicaConfig\n"
        "from replicator.controller import open_replica\n"
        "import tempfile\n"
        "rc = ReplicaConfig('r', 'file://' + tempfile.mkdtemp(), 'file', {}, 86400.0, 3600.0, 0.02)\n"
        "print(isinstance(open_replica(rc, 'db').inner, MetricsDriver))\n"
        "instruments.enable()\n"
        "print(isinstance(open_replica(rc, 'db').inner, MetricsDriver))\n"
    )
    assert out == ["False", "True"]
