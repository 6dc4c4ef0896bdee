/*
 * mntapi_errors.c - the refusals of libvixMntapi, through the C ABI, without
 * mounting anything (so it runs as any user, and under valgrind):
 *
 *   mntapi_errors MBR_DISK GPT_DISK
 *
 * MBR_DISK holds an ext4 partition (1) and a swap partition (2); GPT_DISK two
 * ext4 partitions. Checks the version of Init, calls before Init, NULL, made-up,
 * closed and after-Exit handles, numberOfDisks 0 and 2, bad connections and
 * disk handles, and the mount refusals that come before any mount (swap,
 * read-write on a read-only set, dismount of an unmounted volume).
 *
 * Prints "mntapi_errors: N checks OK" and exits 0, or names every failure and
 * exits 1.
 */

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vixDiskLib.h"
#include "vixMntapi.h"

static int checks;
static int failures;

static void
expect(const char *what, VixError got, VixError want, int line)
{
   checks++;
   if (got != want) {
      char *text = VixDiskLib_GetErrorText(got, NULL);

      printf("FAILED line %d: %s gave %" PRIu64 " (%s), expected %" PRIu64 "\n", line,
             what, (uint64_t)got, text != NULL ? text : "?", (uint64_t)want);
      VixDiskLib_FreeErrorText(text);
      failures++;
   }
}

static void
expect_true(const char *what, int cond, int line)
{
   checks++;
   if (!cond) {
      printf("FAILED line %d: %s\n", line, what);
      failures++;
   }
}

#define EXPECT(call, want) expect(#call, (call), (want), __LINE__)
#define EXPECT_TRUE(cond) expect_true(#cond, (cond), __LINE__)

static void
quiet(const char *fmt, va_list args)
{
   (void)fmt;
   (void)args;
}

/* Opens a set of one disk; the out handle must be NULL after a failure. */
static VixError
open_disks(VixDiskLibConnection conn, const char *disk, size_t n, uint32 flags,
           VixDiskSetHandle *set)
{
   const char *names[2];
   VixError err;

   names[0] = disk;
   names[1] = disk;
   *set = (VixDiskSetHandle)(uintptr_t)0x10;
   err = VixMntapi_OpenDisks(conn, names, n, flags, set);
   if (err != VIX_OK) {
      expect_true("the set handle is NULL after a failed OpenDisks", *set == NULL,
                  __LINE__);
   }
   return err;
}

static size_t
volumes(VixDiskSetHandle set, VixVolumeHandle **handles)
{
   size_t n = 99;

   *handles = NULL;
   EXPECT(VixMntapi_GetVolumeHandles(set, &n, handles), VIX_OK);
   EXPECT_TRUE(*handles != NULL);
   return n;
}

static VixVolumeType
volume_type(VixVolumeHandle v)
{
   VixVolumeInfo *info = NULL;
   VixVolumeType type = 999;

   EXPECT(VixMntapi_GetVolumeInfo(v, &info), VIX_OK);
   if (info != NULL) {
      type = info->type;
      EXPECT_TRUE(info->isMounted == FALSE);
      EXPECT_TRUE(info->symbolicLink == NULL);
      EXPECT_TRUE(info->numGuestMountPoints == 0);
      VixMntapi_FreeVolumeInfo(info);
   }
   return type;
}

int
main(int argc, char **argv)
{
   VixDiskLibConnection conn = NULL;
   VixDiskLibHandle ro = NULL, rw = NULL, handles[2];
   VixDiskSetHandle set = NULL, stale;
   VixDiskSetHandle madeUp = (VixDiskSetHandle)(uintptr_t)0x123450;
   VixVolumeHandle *vols = NULL, volume, staleVolume;
   VixDiskSetInfo *setInfo = (VixDiskSetInfo *)(uintptr_t)0x40;
   VixVolumeInfo *volInfo = (VixVolumeInfo *)(uintptr_t)0x40;
   VixOsInfo *osInfo = (VixOsInfo *)(uintptr_t)0x40;
   size_t n = 7;
   const char *mbr, *gpt;

   if (argc != 3) {
      fprintf(stderr, "usage: mntapi_errors MBR_DISK GPT_DISK\n");
      return 2;
   }
   mbr = argv[1];
   gpt = argv[2];

   EXPECT(VixDiskLib_InitEx(8, 0, quiet, quiet, NULL, NULL, NULL), VIX_OK);
   EXPECT(VixDiskLib_Connect(NULL, &conn), VIX_OK);

   /* Only version 1.0; nothing opens before Init. */
   EXPECT(VixMntapi_Init(2, 0, quiet, quiet, NULL, NULL, NULL),
          VIX_E_MNTAPI_INCOMPATIBLE_VERSION);
   EXPECT(VixMntapi_Init(1, 1, quiet, quiet, NULL, NULL, NULL),
          VIX_E_MNTAPI_INCOMPATIBLE_VERSION);
   EXPECT(open_disks(conn, mbr, 1, 0, &set), VIX_E_DISK_NOINIT);
   EXPECT(VixMntapi_Init(VIXMNTAPI_MAJOR_VERSION, VIXMNTAPI_MINOR_VERSION, quiet, quiet,
                         NULL, NULL, NULL),
          VIX_OK);

   /* NULL and made-up handles; out pointers become NULL. */
   EXPECT(VixMntapi_GetDiskSetInfo(NULL, &setInfo), VIX_E_INVALID_ARG);
   EXPECT_TRUE(setInfo == NULL);
   EXPECT(VixMntapi_GetVolumeHandles(madeUp, &n, &vols), VIX_E_INVALID_ARG);
   EXPECT_TRUE(n == 0 && vols == NULL);
   EXPECT(VixMntapi_GetOsInfo(NULL, &osInfo), VIX_E_INVALID_ARG);
   EXPECT_TRUE(osInfo == NULL);
   EXPECT(VixMntapi_CloseDiskSet(NULL), VIX_E_INVALID_ARG);
   EXPECT(VixMntapi_CloseDiskSet(madeUp), VIX_E_INVALID_ARG);
   EXPECT(VixMntapi_MountVolume(NULL, TRUE), VIX_E_INVALID_ARG);
   EXPECT(VixMntapi_MountVolume((VixVolumeHandle)(uintptr_t)0x7, TRUE), VIX_E_INVALID_ARG);
   EXPECT(VixMntapi_DismountVolume(NULL, TRUE), VIX_E_INVALID_ARG);
   EXPECT(VixMntapi_GetVolumeInfo(NULL, &volInfo), VIX_E_INVALID_ARG);
   EXPECT_TRUE(volInfo == NULL);
   EXPECT(VixMntapi_GetVolumeInfo(NULL, NULL), VIX_E_INVALID_ARG);
   VixMntapi_FreeDiskSetInfo(NULL);
   VixMntapi_FreeVolumeHandles(NULL);
   VixMntapi_FreeVolumeInfo(NULL);
   VixMntapi_FreeOsInfo(NULL);

   /* OpenDisks arguments. */
   EXPECT(open_disks(conn, mbr, 2, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &set),
          VIX_E_NOT_SUPPORTED);
   EXPECT(open_disks(conn, mbr, 0, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &set),
          VIX_E_INVALID_ARG);
   EXPECT(open_disks(NULL, mbr, 1, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &set),
          VIX_E_DISK_INVALID_CONNECTION);
   EXPECT(open_disks((VixDiskLibConnection)(uintptr_t)0x990, mbr, 1, 0, &set),
          VIX_E_DISK_INVALID_CONNECTION);
   EXPECT(open_disks(conn, "/nonexistent/disk.vmdk", 1, 0, &set), VIX_E_FILE_NOT_FOUND);
   EXPECT(open_disks(conn, mbr, 1, VIXDISKLIB_FLAG_OPEN_SINGLE_LINK, &set),
          VIX_E_NOT_SUPPORTED);
   EXPECT(VixMntapi_OpenDisks(conn, NULL, 1, 0, &set), VIX_E_INVALID_ARG);

   /* An MBR set, read-only: two basic volumes; refusals before any mount. */
   EXPECT(open_disks(conn, mbr, 1, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &set), VIX_OK);
   EXPECT(VixMntapi_GetDiskSetInfo(set, &setInfo), VIX_OK);
   if (setInfo != NULL) {
      EXPECT_TRUE(setInfo->openFlags == VIXDISKLIB_FLAG_OPEN_READ_ONLY);
      EXPECT_TRUE(setInfo->mountPath != NULL && setInfo->mountPath[0] == '/');
      VixMntapi_FreeDiskSetInfo(setInfo);
   }
   n = volumes(set, &vols);
   EXPECT_TRUE(n == 2);
   if (n == 2) {
      EXPECT_TRUE(volume_type(vols[0]) == VIXMNTAPI_BASIC_PARTITION);
      EXPECT_TRUE(volume_type(vols[1]) == VIXMNTAPI_BASIC_PARTITION);
      EXPECT(VixMntapi_MountVolume(vols[1], TRUE), VIX_E_NOT_SUPPORTED);
      EXPECT(VixMntapi_MountVolume(vols[0], FALSE), VIX_E_MNTAPI_VOLUME_NOT_WRITABLE);
      EXPECT(VixMntapi_DismountVolume(vols[0], FALSE), VIX_E_MNTAPI_VOLUME_NOT_MOUNTED);
      /* A set handle is no volume handle, and the other way round. */
      EXPECT(VixMntapi_MountVolume((VixVolumeHandle)set, TRUE), VIX_E_INVALID_ARG);
      EXPECT(VixMntapi_CloseDiskSet((VixDiskSetHandle)vols[0]), VIX_E_INVALID_ARG);
   }
   staleVolume = n > 0 ? vols[0] : NULL;
   VixMntapi_FreeVolumeHandles(vols);
   EXPECT(VixMntapi_CloseDiskSet(set), VIX_OK);
   /* Closed: every handle of the set is stale. */
   stale = set;
   EXPECT(VixMntapi_CloseDiskSet(stale), VIX_E_INVALID_ARG);
   EXPECT(VixMntapi_GetVolumeHandles(stale, &n, &vols), VIX_E_INVALID_ARG);
   EXPECT(VixMntapi_MountVolume(staleVolume, TRUE), VIX_E_INVALID_ARG);
   EXPECT(VixMntapi_GetVolumeInfo(staleVolume, &volInfo), VIX_E_INVALID_ARG);

   /* A GPT set. */
   EXPECT(open_disks(conn, gpt, 1, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &set), VIX_OK);
   n = volumes(set, &vols);
   EXPECT_TRUE(n == 2);
   if (n == 2) {
      EXPECT_TRUE(volume_type(vols[0]) == VIXMNTAPI_GPT_PARTITION);
      EXPECT_TRUE(volume_type(vols[1]) == VIXMNTAPI_GPT_PARTITION);
   }
   VixMntapi_FreeVolumeHandles(vols);
   EXPECT(VixMntapi_CloseDiskSet(set), VIX_OK);

   /* OpenDiskSet takes read-only disk handles of libvixDiskLib. */
   EXPECT(VixDiskLib_Open(conn, mbr, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &ro), VIX_OK);
   handles[0] = ro;
   handles[1] = ro;
   EXPECT(VixMntapi_OpenDiskSet(handles, 2, 0, &set), VIX_E_NOT_SUPPORTED);
   EXPECT_TRUE(set == NULL);
   EXPECT(VixMntapi_OpenDiskSet(handles, 1, 0x1, &set), VIX_E_INVALID_ARG);
   EXPECT(VixMntapi_OpenDiskSet(handles, 1, 0, &set), VIX_OK);
   n = volumes(set, &vols);
   EXPECT_TRUE(n == 2);
   volume = n > 0 ? vols[0] : NULL;
   VixMntapi_FreeVolumeHandles(vols);
   EXPECT(VixMntapi_MountVolume(volume, FALSE), VIX_E_MNTAPI_VOLUME_NOT_WRITABLE);
   EXPECT(VixMntapi_CloseDiskSet(set), VIX_OK);
   EXPECT(VixDiskLib_Close(ro), VIX_OK);
   handles[0] = ro;
   EXPECT(VixMntapi_OpenDiskSet(handles, 1, 0, &set), VIX_E_INVALID_ARG);
   handles[0] = NULL;
   EXPECT(VixMntapi_OpenDiskSet(handles, 1, 0, &set), VIX_E_INVALID_ARG);
   EXPECT(VixDiskLib_Open(conn, mbr, 0, &rw), VIX_OK);
   handles[0] = rw;
   EXPECT(VixMntapi_OpenDiskSet(handles, 1, 0, &set), VIX_E_NOT_SUPPORTED);
   EXPECT(VixDiskLib_Close(rw), VIX_OK);

   /* Exit closes what is open: its handles go stale. */
   EXPECT(open_disks(conn, mbr, 1, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &set), VIX_OK);
   VixMntapi_Exit();
   EXPECT(VixMntapi_GetVolumeHandles(set, &n, &vols), VIX_E_INVALID_ARG);
   EXPECT(VixMntapi_CloseDiskSet(set), VIX_E_INVALID_ARG);

   EXPECT(VixDiskLib_Disconnect(conn), VIX_OK);
   VixDiskLib_Exit();
   if (failures != 0) {
      printf("mntapi_errors: %d of %d checks FAILED\n", failures, checks);
      return 1;
   }
   printf("mntapi_errors: %d checks OK\n", checks);
   return 0;
}
