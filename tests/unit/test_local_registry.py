"""The local Schema Registry's settings and Java discovery, without starting it
(tests/integration starts the real one)."""

from __future__ import annotations

import os
import stat

import pytest

from pipeline.devtools import local_registry
from pipeline.errors import LocalRegistryError


def fake_java(path, version: str):
    """An executable that answers `-version` like a JDK of `version`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2026-01-01' >&2\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_the_port_and_folder_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HIDDENSTATE_REGISTRY_HOME", str(tmp_path))
    monkeypatch.setenv("HIDDENSTATE_REGISTRY_PORT", "28081")
    registry = local_registry.from_environment()
    assert (registry.home, registry.port, registry.management_port) == (tmp_path, 28081, 28082)
    assert registry.url == "http://127.0.0.1:28081/apis/ccompat/v7"


def test_a_port_that_is_not_a_number_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("HIDDENSTATE_REGISTRY_PORT", "registry")
    with pytest.raises(LocalRegistryError, match="HIDDENSTATE_REGISTRY_PORT='registry'"):
        local_registry.from_environment()


def test_a_java_older_than_21_is_passed_over_for_a_newer_one(monkeypatch, tmp_path):
    old = fake_java(tmp_path / "jdk17" / "bin" / "java", "17.0.15")
    new = fake_java(tmp_path / "jvm" / "temurin-25" / "bin" / "java", "25.0.3")
    monkeypatch.setenv("HIDDENSTATE_REGISTRY_JAVA", old)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(local_registry.shutil, "which", lambda name: None)
    monkeypatch.setattr(local_registry, "_JVM_DIR", tmp_path / "jvm")
    assert local_registry.find_java() == new


def test_no_java_new_enough_is_a_clear_error_naming_what_was_tried(monkeypatch, tmp_path):
    old = fake_java(tmp_path / "jdk17" / "bin" / "java", "17.0.15")
    monkeypatch.setenv("HIDDENSTATE_REGISTRY_JAVA", old)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(local_registry.shutil, "which", lambda name: None)
    monkeypatch.setattr(local_registry, "_JVM_DIR", tmp_path / "none")
    with pytest.raises(LocalRegistryError, match=f"needs Java 21 or newer.*{old}"):
        local_registry.find_java()


def test_a_pid_file_of_another_program_is_not_taken_for_the_registry(tmp_path):
    registry = local_registry.LocalRegistry(home=tmp_path)
    registry.pid_file.write_text(f"{os.getpid()}\n")  # alive, but pytest, not the registry
    assert local_registry.running_pid(registry) is None


def test_missing_maven_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(local_registry.shutil, "which", lambda name: None)
    with pytest.raises(LocalRegistryError, match=r"mvn .* is not on PATH"):
        local_registry._fetch_app(local_registry.LocalRegistry(home=tmp_path))


def test_nothing_answers_where_no_registry_listens():
    assert not local_registry.answers("http://127.0.0.1:9/apis/ccompat/v7")
