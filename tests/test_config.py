"""The node's configuration: embedded defaults, a file, the environment."""

from __future__ import annotations

from dataclasses import replace

import pytest

from config import ConfigError, load_config


def test_defaults_have_the_documented_keys():
    c = load_config(environ={})
    assert c.node.ae_title == "LUNGSYS" and c.node.port == 11112
    assert c.node.host == "0.0.0.0" and c.node.data_dir == "var"
    assert c.node.allowed_calling_aets == ()
    assert c.store.url == "sqlite:///var/lungsys.db"
    assert (c.assembly.stable_seconds, c.assembly.min_slices) == (10, 20)
    assert c.model.checkpoint == "" and c.model.device == "auto"
    assert c.http.port == 8080                       # STOW-RS, health, metrics on by default
    assert c.destinations == ()


def test_file_then_environment(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text('[node]\nae_title = "AI1"\nport = 104\n[assembly]\nstable_seconds = 3\n'
                 '[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "ORTHANC"\n'
                 'host = "127.0.0.1"\nport = 4242\n'
                 '[[destinations]]\nname = "web"\nkind = "dicomweb"\n'
                 'url = "http://127.0.0.1:8042/dicom-web"\n')
    c = load_config(f, environ={"LUNGSYS_NODE_PORT": "11113",
                                "LUNGSYS_NODE_ALLOWED_CALLING_AETS": '["CT1", "PACS"]',
                                "LUNGSYS_STORE_URL": "postgresql+psycopg://db/lungsys",
                                "LUNGSYS_DICOMWEB_PORT": "0"})
    assert c.node.ae_title == "AI1" and c.node.port == 11113
    assert c.node.allowed_calling_aets == ("CT1", "PACS")
    assert c.assembly.stable_seconds == 3
    assert c.http.port == 0                          # LUNGSYS_DICOMWEB_*: the old name, read
    assert c.store.url.startswith("postgresql")
    assert [(d.name, d.kind, d.port, d.url) for d in c.destinations] == [
        ("pacs", "dimse", 4242, ""), ("web", "dicomweb", 0, "http://127.0.0.1:8042/dicom-web")]


@pytest.mark.parametrize("text, words", [
    ("[node]\nport = 'eleven'\n", "node.port: expected an integer"),
    ("[node]\nportt = 1\n", "node.portt: unknown key"),
    ("[nodes]\nport = 1\n", "unknown section [nodes]"),
    ("[node]\nae_title = 'A_VERY_LONG_AE_TITLE'\n", "node.ae_title"),
    ("[[destinations]]\nkind = 'ftp'\n", "destinations[0].kind: expected one of dimse, dicomweb"),
    ("[[destinations]]\nkind = 'dimse'\nhost = '127.0.0.1'\n", "destinations[0].ae_title"),
    ("[node\n", "not valid TOML"),
])
def test_bad_configuration_names_the_key(tmp_path, text, words):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, environ={})
    assert words in str(err.value)


def test_bad_environment_value():
    with pytest.raises(ConfigError, match="LUNGSYS_ASSEMBLY_MIN_SLICES"):
        load_config(environ={"LUNGSYS_ASSEMBLY_MIN_SLICES": "many"})


@pytest.mark.parametrize("text, words", [
    ("[node]\nport = '11403'\n", "bad.toml: node.port: expected an integer, got '11403'"),
    ("[model]\nbatch_size = 'sixteen'\n", "bad.toml: model.batch_size: expected an integer"),
    ("[node]\nport = 99999\n", "bad.toml: node.port: 1 to 65535, got 99999"),
    ("[dicomweb]\nport = -1\n", "bad.toml: dicomweb.port: 0 to 65535, got -1"),
    ("[node]\nfsync = 'yes'\n", "bad.toml: node.fsync: expected true or false"),
    ("[model]\nmethod = 'vote'\n",
     "bad.toml: model.method: expected one of network, nonparametric, got 'vote'"),
    ("[model]\nheatmaps = 'some'\n", "bad.toml: model.heatmaps: expected one of lesion, all, none"),
    ("[node]\nallowed_calling_aets = 'CT1'\n",
     "bad.toml: node.allowed_calling_aets: expected a list of strings"),
    ("[[destinations]]\nkind = 'dimse'\nae_title = 'P'\nhost = 'h'\nport = 99999\n",
     "bad.toml: destinations[0].port: 1 to 65535, got 99999"),
    ("[[destinations]]\nkind = 'dimse'\nae_title = 'P'\nhost = 'h'\nport = 104\nportt = 1\n",
     "bad.toml: destinations[0]: unknown key(s) portt"),
    ("[tls]\nenabled = true\n", "bad.toml: tls.certificate: required when tls.enabled"),
    ("[node]\nallowed_networks = ['10.0.0.0/33']\n", "node.allowed_networks: '10.0.0.0/33'"),
])
def test_values_are_strictly_typed_and_in_range(tmp_path, text, words):
    """One line naming the file and the key: a wrong type, a value out of range, a bad
    choice, an unknown key."""
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, environ={})
    message = str(err.value)
    assert message.endswith(words.split("bad.toml: ")[-1]) or words in message
    assert message.startswith(str(f)) and "\n" not in message


def test_typed_sections_and_choices():
    from config import DestinationKind, TlsProfile, UserIdentity
    from inference.choices import HeatmapChoice, PatientMethod

    c = load_config(environ={"LUNGSYS_MODEL_METHOD": "nonparametric",
                             "LUNGSYS_NODE_TIMEOUT_SECONDS": "2.5",
                             "LUNGSYS_NODE_FSYNC": "yes"})
    assert c.model.method is PatientMethod.nonparametric
    assert c.model.heatmaps is HeatmapChoice.lesion
    assert c.node.timeout_seconds == 2.5 and c.node.fsync is True
    assert c.node.user_identity is UserIdentity.none and c.tls.profile is TlsProfile.bcp195
    with pytest.raises(Exception):
        c.node.port = 1                                  # frozen
    assert {k.value for k in DestinationKind} == {"dimse", "dicomweb"}


def test_an_empty_destination_name_gets_a_default(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text('[[destinations]]\nname = ""\nkind = "dicomweb"\nurl = "http://127.0.0.1/x"\n'
                 '[[destinations]]\nkind = "dicomweb"\nurl = "http://127.0.0.1/y"\n')
    assert [d.name for d in load_config(f, environ={}).destinations] == [
        "destination-1", "destination-2"]


def test_a_file_named_like_a_variable_is_still_read_strictly(tmp_path):
    f = tmp_path / "LUNGSYS_NODE.toml"
    f.write_text("[node]\nport = '104'\n")
    with pytest.raises(ConfigError, match="node.port: expected an integer"):
        load_config(f, environ={})


def test_the_http_section_was_called_dicomweb(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text("[dicomweb]\nport = 8181\n")
    assert load_config(f, environ={}).http.port == 8181
    f.write_text("[http]\nport = 8282\n")
    assert load_config(f, environ={"LUNGSYS_HTTP_MAX_CONNECTIONS": "4"}).http == \
        replace(load_config(environ={}).http, port=8282, max_connections=4)
    f.write_text("[dicomweb]\nport = 8181\n[http]\nport = 8282\n")
    with pytest.raises(ConfigError, match=r"\[dicomweb\] and \[http\] both given"):
        load_config(f, environ={})
