# The instance manager's long-lived WAL uploader, run on barman's own Python
# (`barman-cloud-python -c <this> <barman-cloud-wal-archive arguments>`): the argument parser,
# cloud interface and uploader of barman-cloud-wal-archive, built once, for many files. Reads
# one WAL file path a line on stdin; answers one line a file on stdout, `ok` once the store
# confirmed the upload, or `error <why>`. Exits at the end of stdin.
import sys
from contextlib import closing

from barman.clients import cloud_walarchive
from barman.cloud import configure_logging
from barman.cloud_providers import get_cloud_interface
from barman.utils import force_str
from barman.xlog import is_any_xlog_file, is_history_file


def answer(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main():
    config = cloud_walarchive.parse_arguments(sys.argv[1:])
    configure_logging(config)
    cloud_interface = get_cloud_interface(config)
    with closing(cloud_interface):
        uploader = cloud_walarchive.CloudWalUploader(
            cloud_interface=cloud_interface,
            server_name=config.server_name,
            compression=config.compression,
            compression_level=config.compression_level,
        )
        while True:
            line = sys.stdin.readline()
            if not line:
                return
            wal_path = line.rstrip("\n")
            try:
                if not is_any_xlog_file(wal_path):
                    raise ValueError("%s is an invalid name for a WAL file" % wal_path)
                upload_kwargs = {}
                if is_history_file(wal_path):
                    upload_kwargs["override_tags"] = config.history_tags
                uploader.upload_wal(wal_path, **upload_kwargs)
            except Exception as exc:
                message = force_str(exc).replace("\n", " ")
                answer("error Barman cloud WAL archiver exception: %s" % message)
                continue
            answer("ok")


if __name__ == "__main__":
    main()
