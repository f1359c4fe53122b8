"""spark_jobs.worker_daemon: Spark's bundled PySpark zips go behind the same version installed, and only then."""
import zipfile

from spark_jobs.worker_daemon import prefer_installed


def bundled(tmp_path, name: str, package: str, version: bytes) -> str:
    path = tmp_path / "lib" / name
    path.parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{package}/__init__.py", "")
        archive.writestr(f"{package}/version.py", version)
    return str(path)


def installed(tmp_path, package: str, version: bytes) -> str:
    site = tmp_path / "site"
    (site / package).mkdir(parents=True, exist_ok=True)
    (site / package / "version.py").write_bytes(version)
    return str(site)


def test_a_bundled_zip_goes_behind_the_same_version_installed(tmp_path):
    pyspark = bundled(tmp_path, "pyspark.zip", "pyspark", b'__version__ = "4.3.0"\n')
    py4j = bundled(tmp_path, "py4j-0.10.9.9-src.zip", "py4j", b"__version__ = '0.10.9.9'\n")
    site = installed(tmp_path, "pyspark", b'__version__ = "4.3.0"\n')
    installed(tmp_path, "py4j", b"__version__ = '0.10.9.9'\n")
    assert prefer_installed(["/project", pyspark, py4j, "/stdlib", site]) == ["/project", "/stdlib", site, pyspark,
                                                                            py4j]


def test_a_bundled_zip_stays_first_when_its_version_is_not_installed(tmp_path):
    pyspark = bundled(tmp_path, "pyspark.zip", "pyspark", b'__version__ = "4.3.0"\n')
    other = installed(tmp_path, "pyspark", b'__version__ = "4.2.1"\n')
    path = ["/project", pyspark, "/stdlib", other]
    assert prefer_installed(path) == path
    assert prefer_installed(["/project", pyspark, "/stdlib"]) == ["/project", pyspark, "/stdlib"]
    broken = tmp_path / "lib" / "py4j-0.1-src.zip"
    broken.write_bytes(b"not a zip")
    assert prefer_installed([str(broken), other]) == [str(broken), other]
