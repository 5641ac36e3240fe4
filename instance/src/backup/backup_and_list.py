# A base backup and the listing of the result in one Python process, run on barman's own Python
# (`barman-cloud-python -c <this> <barman-cloud-backup arguments>`): barman-cloud-backup's main,
# then, on the last line of stdout, what `barman-cloud-backup-list --format json` prints. This
# saves a second Python and boto3 start-up (a second or more on a loaded machine) per backup.
# A failed backup exits as barman-cloud-backup does (its SystemExit), before any listing.
#
# Four changes to barman-cloud-backup's timing, none to what it stores (see `speed_up`):
# - the exclusion rules' regular expressions are built once, not once per file and rule
#   (barman rebuilt them for each of the ~1,000 files of a small cluster: half a second of CPU);
# - one botocore loader for every boto3 session of the process, so the S3 service model is read
#   and parsed once, not once per session: barman makes one per upload worker (forked, so they
#   inherit the parsed model) and one for the listing (0.3 to 0.8 s of CPU each, measured);
# - the upload workers' multiprocessing manager is shut down as soon as the workers are done:
#   barman let it be shut down later, after removing the temporary folder that held its socket,
#   so the shutdown message never arrived and multiprocessing waited one second before killing it;
# - `pg_backup_stop` does not wait for the archive itself: PostgreSQL checks it once a second, so
#   every backup paid at least one idle second there, while the last data was still uploading.
#   The same check (PostgreSQL's own XLogArchiveIsBusy on the files it would wait for) runs
#   every 50 ms once the data is uploaded, before the backup is marked DONE.
import functools
import json
import os
import sys
import time
from contextlib import closing

import botocore.session

from barman import cloud, fs, postgres, xlog
from barman.clients import cloud_backup
from barman.cloud import CloudBackupCatalog
from barman.cloud_providers import get_cloud_interface

# How often the backup looks for its last WAL segment in the archive.
ARCHIVE_POLL_SECONDS = 0.05
# A line on stderr while waiting that long for the archive (PostgreSQL says so after 60 s too).
ARCHIVE_WARNING_SECONDS = 60


def archive_busy(pg_wal, name):
    """PostgreSQL's XLogArchiveIsBusy: whether `name` still waits for the archiver."""
    status = os.path.join(pg_wal, "archive_status", name)
    if os.path.exists(status + ".done"):
        return False
    if os.path.exists(status + ".ready"):
        return True
    if os.path.exists(status + ".done"):
        return False
    # Removed by a checkpoint, so archived.
    return os.path.exists(os.path.join(pg_wal, name))


def files_to_archive(backup_info, stop_info):
    """The files `pg_backup_stop(true)` would wait for, or none when it would not wait: the
    segment holding the byte before the stop location and, on a primary, the backup history
    file (do_pg_backup_stop)."""
    in_recovery = stop_info["in_recovery"]
    mode = stop_info["archive_mode"]
    if (in_recovery and mode != "always") or (not in_recovery and mode not in ("on", "always")):
        return []
    segment_size = int(stop_info["wal_segment_size"])
    timeline = int(stop_info["timeline"])
    stop = xlog.parse_lsn(stop_info["location"])
    last = xlog.location_to_xlogfile_name_offset(
        xlog.format_lsn(stop - 1), timeline, segment_size
    )["file_name"]
    files = [last]
    if not in_recovery:
        start = xlog.parse_lsn(backup_info.begin_xlog)
        history = xlog.location_to_xlogfile_name_offset(
            backup_info.begin_xlog, timeline, segment_size
        )
        files.append("%s.%08X.backup" % (history["file_name"], start % segment_size))
    return files


def stop_concurrent_backup(self):
    """barman's PostgreSQLConnection.stop_concurrent_backup with `pg_backup_stop(false)`, plus
    what the archive check needs (recovery, archive_mode, segment size)."""
    conn = self.connect()
    conn.rollback()
    cur = conn.cursor(cursor_factory=postgres.DictCursor)
    cur.execute("RESET idle_session_timeout")
    try:
        cur.execute(
            "SELECT end_row.lsn AS location, "
            "(SELECT CASE WHEN pg_is_in_recovery() "
            "THEN min_recovery_end_timeline ELSE timeline_id END "
            "FROM pg_control_checkpoint(), pg_control_recovery()"
            ") AS timeline, "
            "end_row.labelfile AS backup_label, "
            "pg_is_in_recovery() AS in_recovery, "
            "current_setting('archive_mode') AS archive_mode, "
            "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size') "
            "AS wal_segment_size, "
            "now() AS timestamp FROM pg_backup_stop(false) AS end_row"
        )
    except postgres.psycopg2.Error as e:
        raise postgres.PostgresException(
            "Error issuing pg_backup_stop command: %s" % postgres.force_str(e).strip()
        )
    stop_info = cur.fetchone()
    self.archive_wait = stop_info
    return stop_info


def wait_for_archive(uploader):
    """Waits until the files `pg_backup_stop` left to archive are archived."""
    stop_info = getattr(uploader.postgres, "archive_wait", None)
    if stop_info is None:
        return
    pg_wal = os.path.join(uploader.backup_info.pgdata, "pg_wal")
    pending = files_to_archive(uploader.backup_info, stop_info)
    started = time.monotonic()
    warned = started
    while True:
        pending = [name for name in pending if archive_busy(pg_wal, name)]
        if not pending:
            return
        if time.monotonic() - warned >= ARCHIVE_WARNING_SECONDS:
            warned = time.monotonic()
            sys.stderr.write(
                "still waiting for WAL archiving of %s (%.0f s)\n"
                % (", ".join(pending), warned - started)
            )
        time.sleep(ARCHIVE_POLL_SECONDS)


def speed_up():
    """Applies the changes above to the pinned barman, each only where barman still has the
    function it replaces (another barman runs unchanged)."""
    if hasattr(fs, "_translate_to_regexp"):
        fs._translate_to_regexp = functools.lru_cache(maxsize=None)(fs._translate_to_regexp)
    if hasattr(botocore.session, "create_loader"):
        botocore.session.create_loader = functools.lru_cache(maxsize=None)(
            botocore.session.create_loader
        )
    interface = getattr(cloud, "CloudInterface", None)
    if interface is not None and hasattr(interface, "close"):
        stock_close = interface.close

        def close(self):
            stock_close(self)
            # The queue proxy knows its manager; `shutdown` runs once (a Finalize).
            manager = getattr(getattr(self, "queue", None), "_manager", None)
            if manager is not None and getattr(manager, "shutdown", None) is not None:
                manager.shutdown()

        interface.close = close
    uploader = getattr(cloud, "CloudBackupUploader", None)
    if uploader is None or not hasattr(postgres.PostgreSQLConnection, "stop_concurrent_backup"):
        return
    stock_stop = postgres.PostgreSQLConnection.stop_concurrent_backup
    stock_finalise = uploader._finalise_copy

    def stop(self):
        if self.server_version < 150000:
            return stock_stop(self)
        return stop_concurrent_backup(self)

    def finalise(self):
        # The data upload first (its tail overlaps the archiving), then the archive check: a
        # failure here fails the backup as a failed pg_backup_stop would.
        stock_finalise(self)
        wait_for_archive(self)

    postgres.PostgreSQLConnection.stop_concurrent_backup = stop
    uploader._finalise_copy = finalise


def main():
    arguments = sys.argv[1:]
    speed_up()
    cloud_backup.main(arguments)
    config = cloud_backup.parse_arguments(arguments)
    cloud_interface = get_cloud_interface(config)
    with closing(cloud_interface):
        catalog = CloudBackupCatalog(
            cloud_interface=cloud_interface, server_name=config.server_name
        )
        backups = catalog.get_backup_list()
        listing = [backups[backup_id].to_json() for backup_id in sorted(backups)]
    sys.stdout.write("\n" + json.dumps({"backups_list": listing}) + "\n")


if __name__ == "__main__":
    main()
