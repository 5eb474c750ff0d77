"""The nats driver logging in with an nkey seed file and with a .creds file (decentralised
JWT authentication), against real nats-server processes with JetStream.

Every key and JWT is made here (server_nats.new_nkey, server_nats.Operator): an nkey
server lists one user's public key; an operator-mode server trusts a generated operator,
with its system account and the accounts APP and OTHER (JetStream on) and NOJS (JetStream
off) preloaded into a memory resolver; it logs at debug level, so its log says why it
refused a login, or as whom it accepted one. Token and user/password logins are in
test_nats_driver.py. A malformed seed or .creds file is BadURL when the driver is opened,
and PermissionDenied (never a hang, nor Transient) when it went bad after that.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("nats")
pytest.importorskip("nkeys")

import nats
import nkeys
from nats.js.errors import NotFoundError as NatsNotFound
from server_nats import FACTORIES, NatsServer, Operator, new_nkey, nkey_config, unique_bucket, write_creds

from replicas import BadURL, PermissionDenied, StorageError, Transient, open_driver
from replicas.nats import CHUNK_BYTES, NATSDriver

pytestmark = pytest.mark.skipif(not FACTORIES, reason="nats-server not installed")

BIG = bytes(range(256)) * (CHUNK_BYTES // 256) + b"tail"  # more than one chunk


# --- servers and credentials -------------------------------------------------------------


@pytest.fixture(scope="module")
def nkey_user() -> tuple[str, str]:
    """(seed, public key) of the one user the nkey server knows."""
    return new_nkey("user")


@pytest.fixture(scope="module")
def nkey_srv(nkey_user: tuple[str, str]) -> Iterator[NatsServer]:
    server = NatsServer(config=nkey_config(nkey_user[1]))
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def operator() -> Operator:
    op = Operator()  # SYS and APP (JetStream)
    op.add_account("OTHER")
    op.add_account("NOJS", jetstream=False)
    op.add_account("ROGUE", trusted=False)  # never preloaded: the server does not know it
    return op


@pytest.fixture(scope="module")
def op_srv(operator: Operator) -> Iterator[NatsServer]:
    server = NatsServer(config=operator.config() + "debug: true\n")  # debug: why a login is refused
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def drivers() -> Iterator[list[NATSDriver]]:
    """Collects drivers a test opens and closes them afterwards."""
    opened: list[NATSDriver] = []
    yield opened
    for driver in opened:
        driver.close()


def opened(drivers: list[NATSDriver], url: str, **options: object) -> NATSDriver:
    driver = open_driver(url, **options)
    assert isinstance(driver, NATSDriver)
    drivers.append(driver)
    return driver


def seed_file(path: Path, seed: str) -> Path:
    path.write_text(seed + "\n")  # as `nk -gen user` writes it
    path.chmod(0o600)
    return path


def stream_config(server: NatsServer, bucket: str, **connect: object):  # type: ignore[no-untyped-def]
    """The object store stream of bucket as another client (nats-py) of the same account sees it."""

    async def main():  # type: ignore[no-untyped-def]
        nc = await nats.connect(f"nats://{server.host}", allow_reconnect=False, **connect)
        try:
            return (await nc.jetstream().stream_info(f"OBJ_{bucket}")).config
        finally:
            await nc.close()

    return asyncio.run(main())


def round_trip(driver: NATSDriver) -> None:
    """put, get, head, list, delete; the first put creates the bucket."""
    info = driver.put("dir/k1", b"first value")
    assert (info.key, info.size) == ("dir/k1", len(b"first value"))
    assert driver.put("k2", BIG).size == len(BIG)
    assert driver.get_bytes("dir/k1") == b"first value"
    assert driver.get_bytes("k2") == BIG
    assert driver.head("k2").size == len(BIG)
    assert [i.key for i in driver.list()] == ["dir/k1", "k2"]
    assert [i.key for i in driver.list("dir/")] == ["dir/k1"]
    driver.delete("dir/k1")
    assert [i.key for i in driver.list()] == ["k2"]
    driver.delete("k2")
    assert list(driver.list()) == []


def assert_refused(driver: NATSDriver, server: NatsServer, secrets: list[str], caplog: pytest.LogCaptureFixture) -> str:
    """The driver's first operation is refused as PermissionDenied, at once, in one line that
    names the server and holds none of secrets (nor do the logs)."""
    began = time.monotonic()
    with pytest.raises(PermissionDenied) as caught:
        driver.put("k", b"v")
    assert time.monotonic() - began < driver.timeout  # refused, not timed out
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    assert "authoriz" in message and server.host in message
    chain = [caught.value, caught.value.__cause__, caught.value.__context__]
    for secret in secrets:
        assert all(secret not in str(exc) for exc in chain if exc is not None)
        assert secret not in caplog.text
    return message


def server_log(server: NatsServer) -> str:
    return server.log.read_text(errors="replace")


# --- nkey ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["option", "query"])
def test_nkey_seed_login_round_trip(
    nkey_srv: NatsServer,
    nkey_user: tuple[str, str],
    drivers: list[NATSDriver],
    tmp_path: Path,
    where: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    seed, _ = nkey_user
    path = seed_file(tmp_path / "user.nk", seed)
    bucket = unique_bucket()
    if where == "option":
        driver = opened(drivers, nkey_srv.url(bucket), nkey_path=str(path))
    else:
        driver = opened(drivers, nkey_srv.url(bucket) + f"?nkey_path={urllib.parse.quote(str(path))}")
    round_trip(driver)  # the seed file is the only credential the driver has
    # The driver created the bucket: another client logged in with the same nkey sees it.
    config = stream_config(nkey_srv, bucket, nkeys_seed=str(path))
    assert f"$O.{bucket}.C.>" in config.subjects and config.allow_rollup_hdrs
    assert seed not in caplog.text and seed not in driver.url and seed not in repr(driver)


def test_wrong_nkey_seed_is_refused(
    nkey_srv: NatsServer,
    nkey_user: tuple[str, str],
    drivers: list[NATSDriver],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    stranger_seed, stranger = new_nkey("user")  # a well-formed seed the server does not know
    path = seed_file(tmp_path / "stranger.nk", stranger_seed)
    driver = opened(drivers, nkey_srv.url(unique_bucket()), nkey_path=str(path), timeout=5)
    assert_refused(driver, nkey_srv, [stranger_seed, nkey_user[0]], caplog)
    # The server refused that nkey (the driver signed the nonce with the seed it was given).
    assert f'authentication error - Nkey "{stranger}"' in server_log(nkey_srv)


def test_nkey_server_refuses_a_driver_without_credentials(
    nkey_srv: NatsServer, drivers: list[NATSDriver], caplog: pytest.LogCaptureFixture
) -> None:
    # The server really requires the nkey: the round trip above is not an open door.
    driver = opened(drivers, nkey_srv.url(unique_bucket()), timeout=5)
    assert_refused(driver, nkey_srv, [], caplog)


def test_nkey_seed_option_must_name_a_file(tmp_path: Path) -> None:
    with pytest.raises(BadURL, match="nkey_path"):
        open_driver(f"nats://127.0.0.1:1/{unique_bucket()}", nkey_path=str(tmp_path / "missing.nk"))


# --- creds (decentralised JWT authentication) ------------------------------------------------


def test_creds_login_round_trip_with_jetstream(
    op_srv: NatsServer, operator: Operator, drivers: list[NATSDriver], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    jwt, seed = operator.user("APP")
    creds = write_creds(tmp_path / "app.creds", jwt, seed)
    bucket = unique_bucket()
    driver = opened(drivers, op_srv.url(bucket), creds_path=str(creds))
    round_trip(driver)  # the first put created the bucket: JetStream works for the account
    user = nkeys.from_seed(bytearray(seed.encode())).public_key.decode()
    assert f'Authenticated JWT: Client "{user}"' in server_log(op_srv)  # as that user, by its JWT
    config = stream_config(op_srv, bucket, user_credentials=str(creds))
    assert f"$O.{bucket}.M.>" in config.subjects and config.allow_rollup_hdrs
    # Streams belong to the account: a user of another account does not see this bucket.
    other = operator.creds(tmp_path / "other.creds", "OTHER")
    with pytest.raises(NatsNotFound):
        stream_config(op_srv, bucket, user_credentials=str(other))
    assert seed not in caplog.text and jwt not in caplog.text


def test_users_of_two_accounts_have_separate_buckets(
    op_srv: NatsServer, operator: Operator, drivers: list[NATSDriver], tmp_path: Path
) -> None:
    bucket = unique_bucket()
    app = opened(drivers, op_srv.url(bucket), creds_path=str(operator.creds(tmp_path / "app.creds")))
    other = opened(drivers, op_srv.url(bucket), creds_path=str(operator.creds(tmp_path / "other.creds", "OTHER")))
    app.put("k", b"from APP")
    other.put("k", b"from OTHER")  # same bucket name, the other account's own stream
    assert app.get_bytes("k") == b"from APP"
    assert other.get_bytes("k") == b"from OTHER"
    # a second user of APP shares APP's bucket
    again = opened(drivers, op_srv.url(bucket), creds_path=str(operator.creds(tmp_path / "app2.creds")))
    assert again.get_bytes("k") == b"from APP"


def _creds_case(case: str, operator: Operator) -> tuple[str, str]:
    """(user JWT, seed) of a .creds file the server must refuse."""
    if case == "account not trusted":
        return operator.user("ROGUE")  # a user JWT signed by an account the server does not know
    if case == "seed of another user":
        return operator.user("APP")[0], operator.user("APP")[1]  # the nonce signature cannot match
    if case == "expired":
        return operator.user("APP", expires=int(time.time()) - 60)
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "server_says"),
    [
        ("account not trusted", "Account JWT lookup error: account missing"),
        ("seed of another user", "Signature not verified"),
        ("expired", "User JWT no longer valid: &{Issues:[claim is expired]}"),
    ],
)
def test_refused_creds(
    op_srv: NatsServer,
    operator: Operator,
    drivers: list[NATSDriver],
    tmp_path: Path,
    case: str,
    server_says: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    jwt, seed = _creds_case(case, operator)
    path = write_creds(tmp_path / "refused.creds", jwt, seed)
    offset = op_srv.log.stat().st_size
    driver = opened(drivers, op_srv.url(unique_bucket()), creds_path=str(path), timeout=5)
    assert_refused(driver, op_srv, [seed, jwt, operator.seed], caplog)
    logged = op_srv.log.read_bytes()[offset:].decode(errors="replace")
    assert server_says in logged and "authentication error" in logged  # refused for that reason


def test_operator_server_refuses_a_driver_without_credentials(
    op_srv: NatsServer, drivers: list[NATSDriver], caplog: pytest.LogCaptureFixture
) -> None:
    driver = opened(drivers, op_srv.url(unique_bucket()), timeout=5)
    assert_refused(driver, op_srv, [], caplog)


def test_account_without_jetstream_cannot_create_a_bucket(
    op_srv: NatsServer, operator: Operator, drivers: list[NATSDriver], tmp_path: Path
) -> None:
    # The login works (a valid user of a trusted account), but the account JWT has no
    # JetStream limits: the put fails saying why, it never seems to succeed.
    creds = operator.creds(tmp_path / "nojs.creds", "NOJS")
    driver = opened(drivers, op_srv.url(unique_bucket()), creds_path=str(creds), timeout=3)
    with pytest.raises(StorageError, match="JetStream not enabled for account") as caught:
        driver.put("k", b"v")
    assert "\n" not in str(caught.value) and "authorization failed" not in str(caught.value)
    assert not isinstance(caught.value, Transient), caught.value  # a configuration state, not an outage


# --- malformed credential files ---------------------------------------------------------------


def assert_secret_free(exc: BaseException, secrets: list[str], caplog: pytest.LogCaptureFixture) -> str:
    """exc's message is one line and neither it, its chain nor the logs hold any of secrets."""
    message = str(exc)
    assert "\n" not in message and "\r" not in message
    chain = [exc, exc.__cause__, exc.__context__]
    for secret in secrets:
        assert all(secret not in str(e) for e in chain if e is not None)
        assert secret not in caplog.text
    return message


@pytest.mark.timeout(30)
@pytest.mark.parametrize("option", ["nkey_path", "creds_path"])
def test_malformed_credential_file_is_a_configuration_error(
    op_srv: NatsServer,
    operator: Operator,
    tmp_path: Path,
    option: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "broken"
    secrets = ["SUNOTAVALIDSEED"]
    if option == "nkey_path":
        path.write_text("SUNOTAVALIDSEED\n")
    else:
        jwt, _ = operator.user("APP")
        write_creds(path, jwt, "SUNOTAVALIDSEED")
        secrets.append(jwt)
    with pytest.raises(BadURL) as caught:  # refused when opened, before any connection
        open_driver(op_srv.url(unique_bucket()), timeout=3, **{option: str(path)})
    message = assert_secret_free(caught.value, secrets, caplog)
    assert option in message and str(path) in message and "nkey seed" in message


BEGIN_JWT, END_JWT = "-----BEGIN NATS USER JWT-----\n", "------END NATS USER JWT------\n"
BEGIN_SEED, END_SEED = "-----BEGIN USER NKEY SEED-----\n", "------END USER NKEY SEED------\n"


def broken_creds(case: str, jwt: str, seed: str) -> str:
    """The contents of a .creds file that lacks a part or holds a broken one."""
    return {
        "seed block only": f"{BEGIN_SEED}{seed}\n{END_SEED}",
        "seed block only, no newline at the end": f"{BEGIN_SEED}{seed}",
        "empty JWT block": f"{BEGIN_JWT}{END_JWT}\n{BEGIN_SEED}{seed}\n{END_SEED}",
        "JWT marker on the last line": f"{BEGIN_SEED}{seed}\n{END_SEED}\n{BEGIN_JWT}",
        "JWT block only": f"{BEGIN_JWT}{jwt}\n{END_JWT}",
        "empty seed block": f"{BEGIN_JWT}{jwt}\n{END_JWT}\n{BEGIN_SEED}{END_SEED}",
        "public key for a seed": f"{BEGIN_JWT}{jwt}\n{END_JWT}\n{BEGIN_SEED}{new_nkey('user')[1]}\n{END_SEED}",
        "empty file": "",
    }[case]


CASES = [
    "seed block only",
    "seed block only, no newline at the end",
    "empty JWT block",
    "JWT marker on the last line",
    "JWT block only",
    "empty seed block",
    "public key for a seed",
    "empty file",
]


@pytest.mark.timeout(30)  # nats-py's own .creds reader loops forever on a file without a JWT block
@pytest.mark.parametrize("case", CASES)
def test_incomplete_creds_file_is_refused_at_open(
    operator: Operator, tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    jwt, seed = operator.user("APP")
    path = tmp_path / "incomplete.creds"
    path.write_text(broken_creds(case, jwt, seed))
    with pytest.raises(BadURL) as caught:
        open_driver(f"nats://127.0.0.1:1/{unique_bucket()}", creds_path=str(path))
    message = assert_secret_free(caught.value, [seed, jwt], caplog)
    assert "creds_path" in message and str(path) in message


@pytest.mark.timeout(30)
@pytest.mark.parametrize("reopen", [False, True], ids=["before the first connection", "after a reset"])
def test_creds_file_replaced_by_a_seed_only_file_is_refused_not_hung(
    op_srv: NatsServer,
    operator: Operator,
    drivers: list[NATSDriver],
    tmp_path: Path,
    reopen: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    jwt, seed = operator.user("APP")
    path = write_creds(tmp_path / "app.creds", jwt, seed)
    driver = opened(drivers, op_srv.url(unique_bucket()), creds_path=str(path), timeout=3)
    if reopen:
        driver.put("k", b"v")  # logged in with the good file
    path.write_text(broken_creds("seed block only", jwt, seed))  # e.g. a botched rotation
    if reopen:
        driver.reset()  # the next operation connects again, reading the file anew
    began = time.monotonic()
    with pytest.raises(PermissionDenied) as caught:
        driver.head("k")
    assert time.monotonic() - began < driver.timeout  # refused at once, not timed out
    message = assert_secret_free(caught.value, [seed, jwt], caplog)
    assert "creds_path" in message and str(path) in message and op_srv.host in message
    driver.close()
    assert not driver._thread.is_alive()  # the loop thread is not stuck in a parser
    # the file put right works again (in a new driver: this one is closed)
    write_creds(path, jwt, seed)
    again = opened(drivers, op_srv.url(driver.bucket), creds_path=str(path), timeout=3)
    assert [info.key for info in again.list()] == (["k"] if reopen else [])


@pytest.mark.timeout(30)
def test_nkey_file_replaced_by_a_malformed_one_is_refused(
    nkey_srv: NatsServer,
    nkey_user: tuple[str, str],
    drivers: list[NATSDriver],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    seed, _ = nkey_user
    path = seed_file(tmp_path / "user.nk", seed)
    driver = opened(drivers, nkey_srv.url(unique_bucket()), nkey_path=str(path), timeout=3)
    path.write_text("SUNOTAVALIDSEED\n")
    with pytest.raises(PermissionDenied) as caught:
        driver.head("k")
    message = assert_secret_free(caught.value, [seed, "SUNOTAVALIDSEED"], caplog)
    assert "nkey_path" in message and str(path) in message


@pytest.mark.timeout(60)
def test_creds_file_broken_while_connected_is_refused_at_the_reconnect(
    operator: Operator, drivers: list[NATSDriver], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # nats-py reconnects by itself (here: after a server restart), reading the file anew
    # each time: the operations waiting for that reconnect fail as PermissionDenied.
    caplog.set_level(logging.DEBUG)
    server = NatsServer(config=operator.config())
    server.start()
    try:
        jwt, seed = operator.user("APP")
        path = write_creds(tmp_path / "app.creds", jwt, seed)
        driver = opened(drivers, server.url(unique_bucket()), creds_path=str(path), timeout=3)
        driver.put("k", b"v")
        path.write_text(broken_creds("seed block only", jwt, seed))
        server.restart()
        with pytest.raises(PermissionDenied) as caught:
            driver.head("k")
        message = assert_secret_free(caught.value, [seed, jwt], caplog)
        assert "creds_path" in message and str(path) in message
        driver.close()
        assert not driver._thread.is_alive()
    finally:
        server.cleanup()
