"""The plugin contract's helpers, used directly as plugins use them."""

import json
import os
import threading

import tylstore
from tylstore import TYLHelpers

QUERY_MAP = {'vsphere_virtual_machine': 'name', 'digitalocean_droplet': 'name'}

STATE_V4 = {
    'version': 4, 'serial': 3, 'lineage': 'l',
    'resources': [
        {'mode': 'managed', 'type': 'vsphere_virtual_machine', 'name': 'web',
         'instances': [{'attributes': {'name': 'web-1'}}, {'attributes': {'name': 'web-2'}}]},
        {'mode': 'managed', 'type': 'null_resource', 'name': 'other',
         'instances': [{'attributes': {'name': 'not-a-host'}}]},
    ],
}

STATE_V3 = {
    'version': 3, 'serial': 1, 'lineage': 'l',
    'modules': [{'path': ['root'], 'resources': {
        'digitalocean_droplet.db': {'type': 'digitalocean_droplet',
                                    'primary': {'id': '1', 'attributes': {'name': 'db-1'}}},
        'null_resource.x': {'type': 'null_resource', 'primary': {'attributes': {'name': 'x'}}},
    }}],
}


def test_host_names_from_version_4_state():
    assert TYLHelpers.get_hostnames_from_tfstate(STATE_V4, QUERY_MAP) == ['web-1', 'web-2']
    assert TYLHelpers.get_hostnames_from_tfstate(json.dumps(STATE_V4), QUERY_MAP) == ['web-1', 'web-2']


def test_host_names_from_version_3_state_and_pyterrabacktyl_jsonpath_values():
    old_map = {'digitalocean_droplet': 'modules[*].resources.*.primary.attributes.name'}
    assert TYLHelpers.get_hostnames_from_tfstate(STATE_V3, old_map) == ['db-1']


def test_host_names_of_no_state_is_an_empty_list():
    assert TYLHelpers.get_hostnames_from_tfstate('', QUERY_MAP) == []
    assert TYLHelpers.get_hostnames_from_tfstate({}, QUERY_MAP) == []


def test_lock_id_reads_text_bytes_and_objects():
    assert tylstore.lock_id('{"ID": "a"}') == 'a'
    assert tylstore.lock_id(b'{"ID": "b"}') == 'b'
    assert tylstore.lock_id({'ID': 'c'}) == 'c'
    assert tylstore.lock_id('') == '' and tylstore.lock_id('not json') == ''
    assert tylstore.lock_id({'ID': 7}) == ''


def test_create_file_durably_lets_exactly_one_of_many_racers_win(tmp_path):
    path = str(tmp_path / 'lock.json')
    barrier = threading.Barrier(16)
    results = []

    def race(number):
        barrier.wait(10)
        results.append((tylstore.create_file_durably(path, b'racer %d' % number), number))

    threads = [threading.Thread(target=race, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    winners = [number for won, number in results if won]
    assert len(results) == 16 and len(winners) == 1
    assert open(path, 'rb').read() == b'racer %d' % winners[0]
    assert os.listdir(str(tmp_path)) == ['lock.json']


def test_write_file_durably_replaces_whole_files_privately(tmp_path):
    path = str(tmp_path / 'state')
    tylstore.write_file_durably(path, b'first, longer content')
    tylstore.write_file_durably(path, b'second')
    assert open(path, 'rb').read() == b'second'
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.listdir(str(tmp_path)) == ['state']


def test_abc_tylstore_is_the_contract_for_old_plugins():
    import tylserver
    tylserver.load_plugins(tylserver.load_config(environ={}))
    import abc_tylstore
    assert abc_tylstore.TYLPersistent is tylstore.TYLPersistent


def test_read_all_reads_to_the_end_even_past_the_size_fstat_gave(tmp_path, monkeypatch):
    path = tmp_path / 'grown'
    data = os.urandom(3 * 1024 * 1024 + 17)
    path.write_bytes(data)
    real_fstat = os.fstat
    for reported in (0, 100, len(data)):
        monkeypatch.setattr(os, 'fstat', lambda fd: os.stat_result(
            real_fstat(fd)[:6] + (reported,) + real_fstat(fd)[7:]))
        fd = os.open(str(path), os.O_RDONLY)
        try:
            assert tylstore.read_all(fd) == data, reported
        finally:
            os.close(fd)
    path.write_bytes(b'')
    monkeypatch.undo()
    fd = os.open(str(path), os.O_RDONLY)
    try:
        assert tylstore.read_all(fd) == b''
    finally:
        os.close(fd)
