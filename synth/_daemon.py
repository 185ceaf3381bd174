"""The Python workers' daemon (spark.python.daemon.module): pyspark.daemon, minus a per-task cost.

Before every task a Python worker calls importlib.invalidate_caches() (pyspark's setup_spark_files,
for files added with addPyFile). On Python 3.10 and 3.11 each zipimporter then reads its archive's
directory again at once: about 16 importers over pyspark.zip and py4j's zip, about 0.1 s of CPU per
task however small the task (Python 3.12 made the re-read lazy). Here an importer reads its archive
again only when the file changed since it last read it.
"""
from __future__ import annotations

import os
import sys
import zipimport

from pyspark import daemon


def _invalidate_when_changed(invalidate):
    def invalidate_caches(self):
        try:
            status = os.stat(self.archive)
            stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
        except OSError:
            stamp = None
        if stamp is None or getattr(self, "_read_stamp", None) != stamp:
            invalidate(self)
            self._read_stamp = stamp

    return invalidate_caches


if sys.version_info < (3, 12):
    zipimport.zipimporter.invalidate_caches = _invalidate_when_changed(zipimport.zipimporter.invalidate_caches)

if __name__ == "__main__":
    daemon.manager()
