"""RABBITMQ_URL naming a cluster: parsing in the settings, masking, and the shuffled ring every client shares.

Nothing here connects: building parameters, a broker or a publisher opens no socket.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator

import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from brownout._dispatch.publisher import Publisher
from brownout._dispatch.queues import BrownoutRabbitmqBroker
from brownout._dispatch.rabbitmq_nodes import NodeRing, split_node_urls
from brownout._redaction import mask_secrets
from brownout._settings import ConfigurationError, Settings, load_settings
from tests.support.rabbit_nodes import InOrder

A = "amqp://app:pw-one@rabbit-a.internal:5672/shop"
B = "amqp://app:pw-two@rabbit-b.internal:5672/shop"
C = "amqp://app:pw-three@rabbit-c.internal:5673/shop"


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """DATABASE_URL only; RABBITMQ_URL comes from each test."""
    for name in list(os.environ):
        if name.upper().startswith("BROWNOUT_") or name.upper() in ("DATABASE_URL", "RABBITMQ_URL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2@127.0.0.1:5432/shop")
    yield


def refusal(value: str) -> str:
    with pytest.raises(ConfigurationError) as info:
        load_settings(rabbitmq_url=value)
    return str(info.value)


# -- settings ---------------------------------------------------------------------------------------


def test_a_single_url_is_a_list_of_one_and_unchanged() -> None:
    settings = load_settings(rabbitmq_url=A)
    assert settings.rabbitmq_url == A
    assert settings.rabbitmq_urls == (A,)


def test_several_urls_are_split_on_semicolons_and_stripped() -> None:
    settings = load_settings(rabbitmq_url=f"  {A} ;{B};\n{C}  ")
    assert settings.rabbitmq_urls == (A, B, C)
    assert settings.rabbitmq_url == f"{A};{B};{C}"  # the normalised form every client splits the same way


def test_unset_or_empty_means_no_write_path() -> None:
    assert load_settings().rabbitmq_urls == ()
    assert load_settings(rabbitmq_url="").rabbitmq_url is None
    assert load_settings(rabbitmq_url="   ").rabbitmq_urls == ()


@pytest.mark.parametrize("value", [f"{A};;{B}", f"{A};", f";{A}", f"{A}; ;{B}", ";"])
def test_an_empty_element_is_a_settings_error(value: str) -> None:
    message = refusal(value)
    assert "RABBITMQ_URL" in message and "is empty" in message


def test_amqp_and_amqps_mixed_are_refused() -> None:
    message = refusal(f"{A};{B.replace('amqp://', 'amqps://')}")
    assert "RABBITMQ_URL" in message and "mixes amqp:// and amqps://" in message


def test_the_same_scheme_everywhere_is_fine_including_amqps() -> None:
    tls = [url.replace("amqp://", "amqps://") for url in (A, B)]
    assert load_settings(rabbitmq_url=";".join(tls)).rabbitmq_urls == tuple(tls)


def test_each_url_carries_its_own_credentials_and_they_may_differ() -> None:
    other = B.replace("app:pw-two", "reporting:pw-x")
    assert load_settings(rabbitmq_url=f"{A};{other}").rabbitmq_urls == (A, other)


def test_a_url_without_credentials_beside_one_with_them_is_refused() -> None:
    message = refusal(f"{A};amqp://rabbit-b.internal:5672/shop")
    assert "node URL 2" in message and "guest" in message


def test_different_vhosts_are_refused() -> None:
    message = refusal(f"{A};{B.replace('/shop', '/other')}")
    assert "vhosts 'other', 'shop'" in message


def test_the_default_vhost_written_two_ways_is_one_vhost() -> None:
    first, second = "amqp://u:p@h1:5672/%2F", "amqp://u:p@h2:5672"
    assert load_settings(rabbitmq_url=f"{first};{second}").rabbitmq_urls == (first, second)


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ("http://app:pw-bad@rabbit-b.internal/shop", "not amqp:// or amqps://"),
        ("rabbit-b.internal:5672", "not amqp:// or amqps://"),
        ("amqp://app:pw-bad@rabbit-b.internal:5672/shop?heartbeat_interval=5", "Unknown URL parameter"),
        ("amqp://app:pw-bad@rabbit-b.internal:99999/shop", "node URL 2 of 2"),
    ],
)
def test_an_invalid_node_is_named_with_its_password_masked(bad: str, said: str) -> None:
    message = refusal(f"{A};{bad}")
    assert said in message and "node URL 2 of 2" in message
    assert "pw-bad" not in message and "pw-one" not in message


def test_a_refusal_shows_no_password() -> None:
    message = refusal(f"{A};{B.replace('/shop', '/other')};")
    assert "pw-one" not in message and "pw-two" not in message


# -- masking -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "joined",
    [
        f"{A};{B};{C}",
        "amqp://app:pw-one@rabbit-a.internal:5672;amqp://app:pw-two@rabbit-b.internal:5672",  # no path: ; then ://
        "amqp://app:pw-one@rabbit-a.internal;amqp://rabbit-b.internal;amqps://app:pw-two@rabbit-c.internal/%2F",
    ],
)
def test_every_password_of_the_joined_form_is_masked_and_the_hosts_kept(joined: str) -> None:
    masked = mask_secrets(joined)
    assert "pw-one" not in masked and "pw-two" not in masked and "pw-three" not in masked
    assert masked.count("app:***@") == joined.count("app:pw-")
    assert "rabbit-a.internal" in masked and "rabbit-b.internal" in masked


def test_the_settings_repr_and_a_rings_description_mask_every_node() -> None:
    settings = load_settings(rabbitmq_url=f"{A};{B}")
    for shown in (repr(settings), str(settings), NodeRing(settings.rabbitmq_urls).where):
        assert "pw-one" not in shown and "pw-two" not in shown
        assert "rabbit-a.internal" in shown and "rabbit-b.internal" in shown
    ring = NodeRing([A, B])
    assert {node.where for node in ring.nodes} == {mask_secrets(A), mask_secrets(B)}


# -- the ring ----------------------------------------------------------------------------------------


def hosts(parameters: list[object]) -> list[str]:
    return [p.host for p in parameters]  # type: ignore[attr-defined]


def test_a_seeded_shuffle_is_repeatable_and_is_the_sources_own() -> None:
    urls = [A, B, C]
    expected = list(urls)
    random.Random(11).shuffle(expected)
    first = NodeRing(urls, rng=random.Random(11))
    second = NodeRing(urls, rng=random.Random(11))
    assert [node.parameters.host for node in first.nodes] == [node.parameters.host for node in second.nodes]
    assert [node.where for node in first.nodes] == [mask_secrets(url) for url in expected]


def test_the_order_is_shuffled_so_a_fleet_spreads_over_the_nodes() -> None:
    urls = [A, B, C]
    firsts = {NodeRing(urls, rng=random.Random(seed)).next_node().parameters.host for seed in range(60)}
    orders = {tuple(hosts(NodeRing(urls, rng=random.Random(seed)).next_order())) for seed in range(60)}
    assert firsts == {"rabbit-a.internal", "rabbit-b.internal", "rabbit-c.internal"}
    assert len(orders) == len(list(itertools.permutations(urls)))  # every order comes up


def test_each_connection_starts_one_node_further_and_lists_every_node() -> None:
    ring = NodeRing([A, B, C], rng=InOrder())
    orders = [hosts(ring.next_order()) for _ in range(4)]
    a, b, c = "rabbit-a.internal", "rabbit-b.internal", "rabbit-c.internal"
    assert orders == [[a, b, c], [b, c, a], [c, a, b], [a, b, c]]
    assert ring.next_node().parameters.host == b


def test_each_node_keeps_its_own_credentials_port_and_vhost_and_gets_the_clients_settings() -> None:
    other = "amqp://reporting:pw-x@rabbit-b.internal:5673/shop?heartbeat=7"
    ring = NodeRing([A, other], rng=InOrder(), configure=lambda p: setattr(p, "socket_timeout", 1.5))
    first, second = ring.next_order()
    assert (first.credentials.username, first.port, first.virtual_host) == ("app", 5672, "shop")
    assert (second.credentials.username, second.port, second.virtual_host, second.heartbeat) == ("reporting", 5673, "shop", 7)
    assert first.socket_timeout == second.socket_timeout == 1.5


def test_split_takes_a_list_as_well_and_checks_it_the_same_way() -> None:
    assert split_node_urls([f" {A}", B]) == (A, B)
    with pytest.raises(ValueError, match="is empty"):
        split_node_urls([A, ""])


# -- the clients --------------------------------------------------------------------------------------


def test_dramatiq_reads_semicolons_as_a_node_list_as_the_settings_do() -> None:
    """The convention is Dramatiq's own: its broker splits a ;-joined URL into one parameter set per node."""
    settings = load_settings(rabbitmq_url=f"{A};{B}")
    dramatiqs = RabbitmqBroker(url=settings.rabbitmq_url)
    try:
        assert hosts(dramatiqs.parameters) == [p.host for p in NodeRing(settings.rabbitmq_urls, rng=InOrder()).next_order()]
    finally:
        dramatiqs.close()


def test_the_broker_gives_each_new_connection_every_node_with_its_deadlines_one_further() -> None:
    broker = BrownoutRabbitmqBroker(url=f"{A};{B};{C}", max_length=10, rng=InOrder(), publish_deadline=3.0)
    try:
        first, second = broker.parameters, broker.parameters
        assert hosts(first) == ["rabbit-a.internal", "rabbit-b.internal", "rabbit-c.internal"]
        assert hosts(second) == ["rabbit-b.internal", "rabbit-c.internal", "rabbit-a.internal"]
        assert all(p.socket_timeout == p.stack_timeout == p.blocked_connection_timeout == 3.0 for p in first)
    finally:
        broker.close()


def test_a_publisher_takes_the_settings_list_without_connecting() -> None:
    settings = load_settings(rabbitmq_url=f"{A};{B}")
    publisher = Publisher(url=settings.rabbitmq_urls, queue_name="q", max_length=10, rng=random.Random(3))
    publisher.close()  # never started: nothing to close but its state


def test_a_settings_object_built_from_values_parses_the_same() -> None:
    from brownout._settings import settings_from_values

    settings = settings_from_values(database_url="postgresql://u:p@127.0.0.1/db", rabbitmq_url=f"{A} ; {B}")
    assert settings.rabbitmq_urls == (A, B)
    assert isinstance(settings, Settings)
