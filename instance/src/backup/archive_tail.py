# What a cluster's WAL archive holds past one segment, run on barman's own Python
# (`barman-cloud-python -c <this> <store arguments> <destination> <server name> <segment>`): a
# replica cluster's designated primary asks it about its source's archive to know how far behind
# it is. Prints one JSON line: the number of WAL segments archived after `<segment>` (on its
# timeline or a later one), the oldest of them with the time it was archived, and the newest.
# Only keys after the segment's are listed (S3's StartAfter), so a designated primary that keeps
# up reads a page or two, however long the archive is.
import json
import sys
from contextlib import closing

from barman.clients import cloud_check_wal_archive
from barman.cloud_providers import get_cloud_interface
from barman.xlog import decode_segment_name, hash_dir, is_wal_file

# Extensions of a whole segment as barman-cloud-wal-archive names it (none: uncompressed).
COMPRESSIONS = ("", "gz", "bz2", "xz", "snappy", "zst", "lz4")


def main():
    after = sys.argv[-1]
    config = cloud_check_wal_archive.parse_arguments(sys.argv[1:-1])
    cloud_interface = get_cloud_interface(config)
    after_tli, after_log, after_seg = decode_segment_name(after)
    with closing(cloud_interface):
        prefix = "/".join(
            part for part in (cloud_interface.path, config.server_name, "wals") if part
        ) + "/"
        paginator = cloud_interface.s3.meta.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=cloud_interface.bucket_name,
            Prefix=prefix,
            StartAfter=prefix + hash_dir(after) + "/" + after,
        )
        count = 0
        oldest = None
        newest = None
        for page in pages:
            for item in page.get("Contents", []):
                segment, _, extension = item["Key"].rsplit("/", 1)[-1].partition(".")
                if extension not in COMPRESSIONS or not is_wal_file(segment):
                    continue
                tli, log, seg = decode_segment_name(segment)
                if tli < after_tli or (log, seg) <= (after_log, after_seg):
                    continue
                archived = item["LastModified"].timestamp()
                count += 1
                if oldest is None or (log, seg, tli) < oldest[0]:
                    oldest = ((log, seg, tli), segment, archived)
                if newest is None or (log, seg, tli) > newest[0]:
                    newest = ((log, seg, tli), segment, archived)
    print(
        json.dumps(
            {
                "segments": count,
                "oldest": oldest[1] if oldest else None,
                "oldestArchivedAt": oldest[2] if oldest else None,
                "newest": newest[1] if newest else None,
            }
        )
    )


if __name__ == "__main__":
    main()
