# A base backup and the listing of the result in one Python process, run on barman's own Python
# (`barman-cloud-python -c <this> <barman-cloud-backup arguments>`): barman-cloud-backup's main,
# then, on the last line of stdout, what `barman-cloud-backup-list --format json` prints. This
# saves a second Python and boto3 start-up (a second or more on a loaded machine) per backup.
# A failed backup exits as barman-cloud-backup does (its SystemExit), before any listing.
import json
import sys
from contextlib import closing

from barman.clients import cloud_backup
from barman.cloud import CloudBackupCatalog
from barman.cloud_providers import get_cloud_interface


def main():
    arguments = sys.argv[1:]
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
