/*
 * backupFlow.c - the backup flow of the README's main job, through the C ABI of
 * libvixDiskLib (VDDK's functions plus vdisk's VdiskExt_ change-tracking
 * extensions).
 *
 *   backupFlow DIR [-mib N] [-host SERVER -datastore NAME [-port N] [-thumb XX:..]
 *              [-mode MODES]]
 *
 * In DIR (which must exist and be empty of these names) it makes vm.vmdk (256 MiB,
 * or -mib N from 16 to 256; monolithicSparse) with a quarter of it data, turns change tracking on, and runs two backup
 * sessions:
 *   1. a session starts;  2. the disk is snapshotted (CreateChild: the base is
 *   frozen);  3. the "guest" writes to the delta;  4-5. the proxy opens the frozen
 *   snapshot read-only;  6. it copies what is allocated (QueryAllocatedBlocks, full
 *   backup) or what changed since the last backup's change ID
 *   (VdiskExt_QueryChangedAreas, incremental) into a backup disk - an incremental
 *   is a child of the previous backup (CreateChild);  7-9. the delta is
 *   consolidated into the base (its allocated blocks copied down) and unlinked.
 * Then the incremental backup chain is cloned into a fresh disk and every sector is
 * compared with what the base held when the backup was taken.
 *
 * With -host, the proxy is remote, as a VDDK backup proxy is: it connects to the
 * server SERVER (a host, unix:PATH or an NBD URI; -port, -thumb: the server
 * certificate's thumbprint, -mode: the transport modes, e.g. nbdssl) and opens
 * the frozen snapshot there as "[NAME] vm.vmdk" (`vdisk-nbd --datastore NAME=DIR`
 * serves DIR so), reading it, its change ID, its allocated blocks and its changed
 * areas over the network (steps 4-6); the snapshots, the guest's writes, the
 * consolidation and the restore stay local.
 *
 * Exit status 0 when the restore is verified.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vixDiskLib.h"

#include <inttypes.h>

#define MIB (1024u * 1024u)
#define MAX_MIB 256u
/* The disk's size (-mib). */
static uint32_t disk_mib = MAX_MIB;
#define DISK_SECTORS ((uint64_t)disk_mib * MIB / VIXDISKLIB_SECTOR_SIZE)
#define CHUNK_SECTORS 128u           /* QueryAllocatedBlocks granularity (64 KiB) */
#define IO_SECTORS 2048u             /* 1 MiB per read/write */
#define CHECK_SECTORS 2048u          /* verification digest granularity (1 MiB) */
#define MAX_CHECKS (MAX_MIB * MIB / VIXDISKLIB_SECTOR_SIZE / CHECK_SECTORS)
#define NUM_CHECKS (DISK_SECTORS / CHECK_SECTORS)

/* Local: the disks, snapshots, guest writes, consolidation, backups, restore. */
static VixDiskLibConnection conn;
/* The proxy's: the snapshot is read through it (conn, or a remote server). */
static VixDiskLibConnection proxy;
/* -datastore: the name of DIR on the remote server (NULL: the proxy is local). */
static const char *datastore;
static uint8_t buf[IO_SECTORS * VIXDISKLIB_SECTOR_SIZE];
static uint64_t rng_state = 0x2026112400c0ffeeULL;

static uint64_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static int check(VixError err, const char *what)
{
    if (err != VIX_OK) {
        char *text = VixDiskLib_GetErrorText(err, NULL);
        fprintf(stderr, "backupFlow: %s: error %llu: %s\n", what,
                (unsigned long long)err, text ? text : "?");
        VixDiskLib_FreeErrorText(text);
        return -1;
    }
    return 0;
}

#define TRY(call, what)                                                        \
    do {                                                                       \
        if (check((call), (what)) != 0)                                        \
            return -1;                                                         \
    } while (0)

static void fill_random(uint8_t *p, size_t len)
{
    size_t i;
    for (i = 0; i + 8 <= len; i += 8) {
        uint64_t v = rng();
        memcpy(p + i, &v, 8);
    }
}

/* FNV-1a of a buffer. */
static uint64_t fnv(const uint8_t *p, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    size_t i;
    for (i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* Digests of every CHECK_SECTORS of the disk behind `h`. */
static int digests(VixDiskLibHandle h, uint64_t *out)
{
    uint32_t i;
    for (i = 0; i < NUM_CHECKS; i++) {
        TRY(VixDiskLib_Read(h, (uint64_t)i * CHECK_SECTORS, CHECK_SECTORS, buf),
            "Read");
        out[i] = fnv(buf, CHECK_SECTORS * VIXDISKLIB_SECTOR_SIZE);
    }
    return 0;
}

/* Copies the sectors of `list` from `src` to `dst`; adds the sectors to *copied. */
static int copy_blocks(VixDiskLibHandle src, VixDiskLibHandle dst,
                       const VixDiskLibBlockList *list, uint64_t *copied)
{
    uint32_t i;
    for (i = 0; i < list->numBlocks; i++) {
        uint64_t at = list->blocks[i].offset;
        uint64_t end = at + list->blocks[i].length;
        while (at < end) {
            uint64_t n = end - at < IO_SECTORS ? end - at : IO_SECTORS;
            TRY(VixDiskLib_Read(src, at, n, buf), "Read");
            TRY(VixDiskLib_Write(dst, at, n, buf), "Write");
            at += n;
            *copied += n;
        }
    }
    return 0;
}

/* Every allocated block of `h`, in chunks of CHUNK_SECTORS. */
static int allocated(VixDiskLibHandle h, VixDiskLibBlockList **list)
{
    return check(VixDiskLib_QueryAllocatedBlocks(h, 0, DISK_SECTORS, CHUNK_SECTORS,
                                                 list),
                 "QueryAllocatedBlocks");
}

static int open_disk(const char *path, uint32_t flags, VixDiskLibHandle *h)
{
    return check(VixDiskLib_Open(conn, path, flags, h), path);
}

/* The proxy opens the snapshot `base` (DIR/vm.vmdk) read-only: the local file, or
 * "[datastore] vm.vmdk" on the server. */
static int open_snapshot(const char *base, VixDiskLibHandle *h)
{
    char name[4200];
    const char *mode;
    if (datastore == NULL)
        return open_disk(base, VIXDISKLIB_FLAG_OPEN_READ_ONLY, h);
    snprintf(name, sizeof name, "[%s] vm.vmdk", datastore);
    if (check(VixDiskLib_Open(proxy, name, VIXDISKLIB_FLAG_OPEN_READ_ONLY, h), name) != 0)
        return -1;
    mode = VixDiskLib_GetTransportMode(*h);
    printf("   (remote: \"%s\", transport mode %s)\n", name, mode ? mode : "(null)");
    return 0;
}

/* Guest writes: `count` random 4-64 KiB writes into the delta. */
static int guest_writes(const char *delta, int count, uint64_t *sectors)
{
    VixDiskLibHandle h;
    int i;
    if (open_disk(delta, 0, &h) != 0)
        return -1;
    for (i = 0; i < count; i++) {
        uint64_t n = 8 + rng() % 121;
        uint64_t at = rng() % (DISK_SECTORS - n);
        fill_random(buf, n * VIXDISKLIB_SECTOR_SIZE);
        TRY(VixDiskLib_Write(h, at, n, buf), "guest Write");
        *sectors += n;
    }
    TRY(VixDiskLib_Close(h), "Close");
    return 0;
}

/* Consolidation: the delta's own blocks are copied into the base, then it goes. */
static int consolidate(const char *base, const char *delta)
{
    VixDiskLibHandle d, b;
    VixDiskLibBlockList *list = NULL;
    uint64_t copied = 0;
    if (open_disk(delta, VIXDISKLIB_FLAG_OPEN_READ_ONLY | VIXDISKLIB_FLAG_OPEN_SINGLE_LINK,
                  &d) != 0)
        return -1;
    if (open_disk(base, 0, &b) != 0)
        return -1;
    if (allocated(d, &list) != 0 || copy_blocks(d, b, list, &copied) != 0)
        return -1;
    VixDiskLib_FreeBlockList(list);
    TRY(VixDiskLib_Close(d), "Close");
    TRY(VixDiskLib_Close(b), "Close");
    TRY(VixDiskLib_Unlink(conn, delta), "Unlink");
    printf("8-9. delta consolidated into the base (%llu sectors) and unlinked\n",
           (unsigned long long)copied);
    return 0;
}

struct backup {
    char path[4096];
    char *change_id;
    uint64_t sums[MAX_CHECKS];
};

/* One session; `prev` is the previous backup (NULL for the full one). */
static int session(const char *dir, int n, struct backup *prev, struct backup *out)
{
    char base[4096], delta[4096];
    VixDiskLibHandle b, snap, dst;
    VixDiskLibBlockList *list = NULL;
    uint64_t copied = 0, guest = 0;
    snprintf(base, sizeof base, "%s/vm.vmdk", dir);
    snprintf(delta, sizeof delta, "%s/vm-000001.vmdk", dir);
    snprintf(out->path, sizeof out->path, "%s/backup-%d.vmdk", dir, n);
    printf("\n== session %d (%s)\n1. backup session starts\n", n,
           prev ? "incremental" : "full");

    if (open_disk(base, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &b) != 0)
        return -1;
    TRY(VixDiskLib_CreateChild(b, delta, VIXDISKLIB_DISK_MONOLITHIC_SPARSE, NULL, NULL),
        "CreateChild");
    TRY(VixDiskLib_Close(b), "Close");
    printf("2. snapshot: %s is frozen, the guest now writes to %s\n", base, delta);
    if (guest_writes(delta, 200, &guest) != 0)
        return -1;
    printf("3. the guest wrote %llu sectors to the delta\n", (unsigned long long)guest);

    printf("4-5. the proxy opens the snapshot read-only\n");
    if (open_snapshot(base, &snap) != 0)
        return -1;
    TRY(VdiskExt_GetChangeId(snap, &out->change_id), "VdiskExt_GetChangeId");
    if (digests(snap, out->sums) != 0)
        return -1;
    if (prev == NULL) {
        VixDiskLibCreateParams p;
        memset(&p, 0, sizeof p);
        p.diskType = VIXDISKLIB_DISK_MONOLITHIC_SPARSE;
        p.adapterType = VIXDISKLIB_ADAPTER_SCSI_LSILOGIC;
        p.hwVersion = VIXDISKLIB_HWVERSION_WORKSTATION_6;
        p.capacity = DISK_SECTORS;
        TRY(VixDiskLib_Create(conn, out->path, &p, NULL, NULL), "Create");
        if (allocated(snap, &list) != 0)
            return -1;
    } else {
        VixDiskLibHandle pb;
        if (open_disk(prev->path, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &pb) != 0)
            return -1;
        TRY(VixDiskLib_CreateChild(pb, out->path, VIXDISKLIB_DISK_MONOLITHIC_SPARSE, NULL,
                                   NULL),
            "CreateChild (backup)");
        TRY(VixDiskLib_Close(pb), "Close");
        TRY(VdiskExt_QueryChangedAreas(snap, prev->change_id, 0, DISK_SECTORS, &list),
            "VdiskExt_QueryChangedAreas");
    }
    if (open_disk(out->path, 0, &dst) != 0 || copy_blocks(snap, dst, list, &copied) != 0)
        return -1;
    printf("6. copied %llu sectors in %u areas (%s) into %s; change ID %s\n",
           (unsigned long long)copied, list->numBlocks,
           prev ? "changed since the last backup" : "allocated", out->path,
           out->change_id);
    VixDiskLib_FreeBlockList(list);
    TRY(VixDiskLib_Close(dst), "Close");
    TRY(VixDiskLib_Close(snap), "Close");
    printf("7. the snapshot is released\n");
    return consolidate(base, delta);
}

/* Clones the backup chain whose top is `b` into `dst` and compares it with b->sums. */
static int restore(const char *dst, const struct backup *b)
{
    VixDiskLibHandle src, r;
    VixDiskLibCreateParams p;
    uint64_t sums[MAX_CHECKS];
    uint32_t i;
    if (open_disk(b->path, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &src) != 0)
        return -1;
    memset(&p, 0, sizeof p);
    p.diskType = VIXDISKLIB_DISK_MONOLITHIC_SPARSE;
    p.adapterType = VIXDISKLIB_ADAPTER_SCSI_LSILOGIC;
    p.hwVersion = VIXDISKLIB_HWVERSION_WORKSTATION_6;
    p.capacity = DISK_SECTORS;
    TRY(VixDiskLib_Create(conn, dst, &p, NULL, NULL), "Create (restore)");
    if (open_disk(dst, 0, &r) != 0)
        return -1;
    for (i = 0; i < NUM_CHECKS; i++) {
        TRY(VixDiskLib_Read(src, (uint64_t)i * CHECK_SECTORS, CHECK_SECTORS, buf), "Read");
        TRY(VixDiskLib_Write(r, (uint64_t)i * CHECK_SECTORS, CHECK_SECTORS, buf), "Write");
    }
    TRY(VixDiskLib_Close(src), "Close");
    TRY(VixDiskLib_Close(r), "Close");
    if (open_disk(dst, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &r) != 0 || digests(r, sums) != 0)
        return -1;
    TRY(VixDiskLib_Close(r), "Close");
    for (i = 0; i < NUM_CHECKS; i++) {
        if (sums[i] != b->sums[i]) {
            fprintf(stderr, "backupFlow: %s: MiB %u differs from the disk at backup time\n",
                    dst, i);
            return -1;
        }
    }
    printf("restored %s into %s: every sector matches the disk at backup time\n",
           b->path, dst);
    return 0;
}

static int flow(const char *dir)
{
    char base[4096], restored[4096];
    VixDiskLibCreateParams p;
    VixDiskLibHandle h;
    VixDiskLibBlockList *list = NULL;
    struct backup *full = calloc(1, sizeof *full), *incr = calloc(1, sizeof *incr);
    VixError err;
    uint32_t i;
    int rc = -1;
    if (full == NULL || incr == NULL)
        goto out;
    snprintf(base, sizeof base, "%s/vm.vmdk", dir);
    memset(&p, 0, sizeof p);
    p.diskType = VIXDISKLIB_DISK_MONOLITHIC_SPARSE;
    p.adapterType = VIXDISKLIB_ADAPTER_SCSI_LSILOGIC;
    p.hwVersion = VIXDISKLIB_HWVERSION_WORKSTATION_6;
    p.capacity = DISK_SECTORS;
    if (check(VixDiskLib_Create(conn, base, &p, NULL, NULL), "Create") != 0 ||
        open_disk(base, 0, &h) != 0)
        goto out;
    for (i = 0; i < disk_mib / 4; i++) { /* a quarter data, 1 MiB runs every 4 MiB */
        fill_random(buf, sizeof buf);
        if (check(VixDiskLib_Write(h, (uint64_t)i * 4 * IO_SECTORS, IO_SECTORS, buf),
                  "Write") != 0)
            goto out;
    }
    if (check(VixDiskLib_Close(h), "Close") != 0 ||
        check(VdiskExt_EnableChangeTracking(conn, base, TRUE),
              "VdiskExt_EnableChangeTracking") != 0)
        goto out;
    printf("%s: %u MiB with %u MiB of data, change tracking on\n", base, (unsigned)disk_mib,
           (unsigned)disk_mib / 4);

    if (session(dir, 1, NULL, full) != 0 || session(dir, 2, full, incr) != 0)
        goto out;

    /* A change ID that is not this disk's is refused with its own code. */
    if (open_snapshot(base, &h) != 0)
        goto out;
    err = VdiskExt_QueryChangedAreas(h, "00000000000000000000000000000000/1", 0,
                                     DISK_SECTORS, &list);
    VixDiskLib_Close(h);
    if (err != VDISK_E_CHANGE_ID_REFUSED || list != NULL) {
        fprintf(stderr, "backupFlow: a foreign change ID gave %llu\n",
                (unsigned long long)err);
        goto out;
    }

    printf("\n== restore\n");
    snprintf(restored, sizeof restored, "%s/restored-full.vmdk", dir);
    if (restore(restored, full) != 0)
        goto out;
    snprintf(restored, sizeof restored, "%s/restored-incremental.vmdk", dir);
    if (restore(restored, incr) != 0)
        goto out;
    printf("Backup flow verified.\n");
    rc = 0;
out:
    if (full != NULL) {
        free(full->change_id);
        free(full);
    }
    if (incr != NULL) {
        free(incr->change_id);
        free(incr);
    }
    return rc;
}

static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s DIR [-mib N] [-host SERVER -datastore NAME [-port N] [-thumb XX:..] "
            "[-mode MODES]]\n",
            argv0);
    exit(2);
}

int main(int argc, char **argv)
{
    VixDiskLibConnectParams cp;
    VixDiskLibConnectParams *rp = NULL;
    const char *dir = NULL, *host = NULL, *thumb = NULL, *modes = NULL;
    uint32_t port = 0;
    int i, rc;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] != '-') {
            if (dir != NULL)
                usage(argv[0]);
            dir = a;
        } else if (i + 1 >= argc) {
            usage(argv[0]);
        } else if (!strcmp(a, "-mib")) {
            disk_mib = (uint32_t)strtoul(argv[++i], NULL, 10);
            if (disk_mib < 16 || disk_mib > MAX_MIB)
                usage(argv[0]);
        } else if (!strcmp(a, "-host")) {
            host = argv[++i];
        } else if (!strcmp(a, "-datastore")) {
            datastore = argv[++i];
        } else if (!strcmp(a, "-port")) {
            port = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (!strcmp(a, "-thumb")) {
            thumb = argv[++i];
        } else if (!strcmp(a, "-mode")) {
            modes = argv[++i];
        } else {
            usage(argv[0]);
        }
    }
    if (dir == NULL || (host == NULL) != (datastore == NULL))
        usage(argv[0]);
    if (check(VixDiskLib_InitEx(8, 0, NULL,
                                NULL, NULL, NULL, NULL),
              "InitEx") != 0)
        return 1;
    memset(&cp, 0, sizeof cp);
    if (check(VixDiskLib_Connect(&cp, &conn), "Connect") != 0)
        return 1;
    proxy = conn;
    if (host != NULL) {
        /* The proxy's connection: read-only, as a backup proxy's. */
        rp = VixDiskLib_AllocateConnectParams();
        if (rp == NULL) {
            fprintf(stderr, "backupFlow: AllocateConnectParams returned NULL\n");
            return 1;
        }
        rp->serverName = (char *)host;
        rp->thumbPrint = (char *)thumb;
        rp->port = port;
        if (check(VixDiskLib_ConnectEx(rp, TRUE, NULL, modes, &proxy),
                  "ConnectEx (the proxy's remote connection)") != 0)
            return 1;
        printf("proxy: connected to %s (port %" PRIu32 ", transport modes %s)\n", host,
               port, modes ? modes : "default");
    }
    rc = flow(dir);
    if (proxy != conn)
        VixDiskLib_Disconnect(proxy);
    VixDiskLib_FreeConnectParams(rp);
    VixDiskLib_Disconnect(conn);
    VixDiskLib_Exit();
    return rc == 0 ? 0 : 1;
}
