"""The loopback object store's protocol: token-guarded uploads, signed time-limited GETs."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from prefect_nanobanana.emulator import LoopbackObjectStore

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def _put(store: LoopbackObjectStore, key: str, token: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "image/png"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.put(f"{store.base_url}/objects/{key}", content=PNG, headers=headers)


def test_upload_then_fetch_with_the_signed_url(loopback_store: LoopbackObjectStore) -> None:
    response = _put(loopback_store, "in/a.png", loopback_store.upload_token)
    assert response.status_code == 201
    body = response.json()
    assert body["key"] == "in/a.png" and body["size"] == len(PNG)

    fetched = httpx.get(body["url"])
    assert fetched.status_code == 200
    assert fetched.content == PNG
    assert fetched.headers["content-type"] == "image/png"


def test_uploads_need_the_token(loopback_store: LoopbackObjectStore) -> None:
    assert _put(loopback_store, "a.png").status_code == 401
    assert _put(loopback_store, "a.png", "wrong").status_code == 401
    assert not (loopback_store.folder / "objects" / "a.png").exists()


def test_head_reports_existence_and_hands_out_a_signed_url(
    loopback_store: LoopbackObjectStore,
) -> None:
    auth = {"Authorization": f"Bearer {loopback_store.upload_token}"}
    assert httpx.head(f"{loopback_store.base_url}/objects/a.png", headers=auth).status_code == 404
    _put(loopback_store, "a.png", loopback_store.upload_token)

    response = httpx.head(f"{loopback_store.base_url}/objects/a.png?expires_in=60", headers=auth)
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(PNG))
    assert httpx.get(response.headers["x-signed-url"]).content == PNG


def test_signatures_valid_expired_tampered(loopback_store: LoopbackObjectStore) -> None:
    _put(loopback_store, "a.png", loopback_store.upload_token)
    _put(loopback_store, "b.png", loopback_store.upload_token)
    good = loopback_store.sign_url("a.png", expires_in=60)
    expired = loopback_store.sign_url("a.png", expires_in=-1)
    flipped = good[:-1] + ("0" if good[-1] != "0" else "1")
    other_key = good.replace("/objects/a.png", "/objects/b.png")
    unsigned = good.split("?")[0]
    later = good.replace("expires=", "expires=9")

    assert httpx.get(good).status_code == 200
    for url in (expired, flipped, other_key, unsigned, later):
        assert httpx.get(url).status_code == 403, url
    assert httpx.head(good).status_code == 200
    assert httpx.head(unsigned).status_code == 403


def test_another_store_instance_does_not_accept_the_signature(tmp_path: Path) -> None:
    with LoopbackObjectStore(tmp_path, upload_token="t") as first:
        _put(first, "a.png", "t")
        url = first.sign_url("a.png")
        port = first.port
    with LoopbackObjectStore(tmp_path, port=port, upload_token="t") as second:
        assert httpx.get(url).status_code == 403
        assert httpx.get(second.sign_url("a.png")).status_code == 200


UNSAFE_KEYS = ["../escape.png", ".hidden", "a/../../b", "a//b", "a/./b", "dir/", "a\\b"]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_refused(loopback_store: LoopbackObjectStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        loopback_store.sign_url(key)
    # Over HTTP (httpx may normalise "." and ".." away, leaving a harmless key).
    response = _put(loopback_store, key, loopback_store.upload_token)
    assert response.status_code in (201, 400, 404)
    folder = loopback_store.folder
    assert not list(folder.rglob(".hidden"))
    assert sorted(path.name for path in folder.parent.iterdir()) == ["store"]


def test_store_binds_only_to_loopback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loopback"):
        LoopbackObjectStore(tmp_path, host="0.0.0.0")
    with pytest.raises(RuntimeError, match="not started"):
        _ = LoopbackObjectStore(tmp_path).base_url
