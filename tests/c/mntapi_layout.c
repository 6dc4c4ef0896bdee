/*
 * mntapi_layout.c - checks include/vixMntapi.h against the VDDK mount API ABI
 * (Linux x86-64) as /work/shared/docs/vddk-api.md section 5 gives it:
 *   1. compile time: _Static_assert on every size and offset, and assignments of
 *      every function to a pointer of the documented type (a differing prototype
 *      is an incompatible-pointer warning, an error under -Werror);
 *   2. run time: sizes, offsets, field sizes, enum values and the mount error
 *      codes compared with the documented values; each mismatch is printed;
 *   3. link time: every function is referenced, so the program only links if
 *      libvixMntapi exports all of them.
 *
 * Prints "mntapi layout OK (N checks)" and exits 0 when everything matches.
 */

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "vixDiskLib.h"
#include "vixMntapi.h"

static int failures;
static int checks;

static void
check_u(const char *what, unsigned long long actual, unsigned long long expected)
{
   checks++;
   if (actual != expected) {
      printf("MISMATCH %s = %llu, expected %llu\n", what, actual, expected);
      failures++;
   }
}

#define FSIZE(type, field) sizeof(((type *)0)->field)

#define SIZE(type, size)                                                   \
   do {                                                                   \
      _Static_assert(sizeof(type) == (size), "sizeof(" #type ") != " #size); \
      check_u("sizeof(" #type ")", sizeof(type), (size));                 \
   } while (0)

#define FIELD(type, field, off, fsize)                                     \
   do {                                                                   \
      _Static_assert(offsetof(type, field) == (off),                       \
                     "offsetof(" #type ", " #field ") != " #off);          \
      _Static_assert(FSIZE(type, field) == (fsize),                        \
                     "sizeof(" #type "." #field ") != " #fsize);           \
      check_u("offsetof(" #type ", " #field ")", offsetof(type, field),   \
              (off));                                                      \
      check_u("sizeof(" #type "." #field ")", FSIZE(type, field), (fsize)); \
   } while (0)

#define CONST(name, value)                                                 \
   check_u(#name, (unsigned long long)(name), (unsigned long long)(value))

/* The handle types point at the documented struct tags. */
static struct VixDiskSetHandleStruct *const set_tag_check = (VixDiskSetHandle)0;
static struct VixVolumeHandleStruct *const volume_tag_check = (VixVolumeHandle)0;

/* Every function, as a pointer of the documented type. */
static VixError (*const p_init)(uint32, uint32, VixDiskLibGenericLogFunc *,
                                VixDiskLibGenericLogFunc *, VixDiskLibGenericLogFunc *,
                                const char *, const char *) = VixMntapi_Init;
static void (*const p_exit)(void) = VixMntapi_Exit;
static VixError (*const p_open_disks)(VixDiskLibConnection, const char **, size_t, uint32,
                                      VixDiskSetHandle *) = VixMntapi_OpenDisks;
static VixError (*const p_open_disk_set)(VixDiskLibHandle *, size_t, uint32,
                                         VixDiskSetHandle *) = VixMntapi_OpenDiskSet;
static VixError (*const p_get_set_info)(VixDiskSetHandle, VixDiskSetInfo **) =
   VixMntapi_GetDiskSetInfo;
static void (*const p_free_set_info)(VixDiskSetInfo *) = VixMntapi_FreeDiskSetInfo;
static VixError (*const p_close)(VixDiskSetHandle) = VixMntapi_CloseDiskSet;
static VixError (*const p_get_volumes)(VixDiskSetHandle, size_t *, VixVolumeHandle **) =
   VixMntapi_GetVolumeHandles;
static void (*const p_free_volumes)(VixVolumeHandle *) = VixMntapi_FreeVolumeHandles;
static VixError (*const p_get_os)(VixDiskSetHandle, VixOsInfo **) = VixMntapi_GetOsInfo;
static void (*const p_free_os)(VixOsInfo *) = VixMntapi_FreeOsInfo;
static VixError (*const p_mount)(VixVolumeHandle, Bool) = VixMntapi_MountVolume;
static VixError (*const p_dismount)(VixVolumeHandle, Bool) = VixMntapi_DismountVolume;
static VixError (*const p_get_volume_info)(VixVolumeHandle, VixVolumeInfo **) =
   VixMntapi_GetVolumeInfo;
static void (*const p_free_volume_info)(VixVolumeInfo *) = VixMntapi_FreeVolumeInfo;

int
main(void)
{
   const void *functions[] = {
      (const void *)&p_init, (const void *)&p_exit, (const void *)&p_open_disks,
      (const void *)&p_open_disk_set, (const void *)&p_get_set_info,
      (const void *)&p_free_set_info, (const void *)&p_close,
      (const void *)&p_get_volumes, (const void *)&p_free_volumes,
      (const void *)&p_get_os, (const void *)&p_free_os, (const void *)&p_mount,
      (const void *)&p_dismount, (const void *)&p_get_volume_info,
      (const void *)&p_free_volume_info,
   };
   size_t i;

   (void)set_tag_check;
   (void)volume_tag_check;
   for (i = 0; i < sizeof functions / sizeof functions[0]; i++) {
      checks++;
      if (*(void *const *)functions[i] == NULL) {
         printf("MISMATCH function %zu is NULL\n", i);
         failures++;
      }
   }

   /* Handles are pointers. */
   SIZE(VixDiskSetHandle, 8);
   SIZE(VixVolumeHandle, 8);
   SIZE(VixOsFamily, 4);
   SIZE(VixVolumeType, 4);

   /* VixOsInfo (40 bytes). */
   SIZE(VixOsInfo, 40);
   FIELD(VixOsInfo, family, 0, 4);
   FIELD(VixOsInfo, majorVersion, 4, 4);
   FIELD(VixOsInfo, minorVersion, 8, 4);
   FIELD(VixOsInfo, osIs64Bit, 12, 1);
   FIELD(VixOsInfo, vendor, 16, 8);
   FIELD(VixOsInfo, edition, 24, 8);
   FIELD(VixOsInfo, osFolder, 32, 8);

   /* VixVolumeInfo (32 bytes, a one-entry array at the end). */
   SIZE(VixVolumeInfo, 32);
   FIELD(VixVolumeInfo, type, 0, 4);
   FIELD(VixVolumeInfo, isMounted, 4, 1);
   FIELD(VixVolumeInfo, symbolicLink, 8, 8);
   FIELD(VixVolumeInfo, numGuestMountPoints, 16, 8);
   FIELD(VixVolumeInfo, inGuestMountPoints, 24, 8);

   /* VixDiskSetInfo (16 bytes). */
   SIZE(VixDiskSetInfo, 16);
   FIELD(VixDiskSetInfo, openFlags, 0, 4);
   FIELD(VixDiskSetInfo, mountPath, 8, 8);

   /* Enumerations and the version. */
   CONST(VIXMNTAPI_MAJOR_VERSION, 1);
   CONST(VIXMNTAPI_MINOR_VERSION, 0);
   CONST(VIXMNTAPI_NO_OS, 0);
   CONST(VIXMNTAPI_WINDOWS, 1);
   CONST(VIXMNTAPI_OTHER, 255);
   CONST(VIXMNTAPI_UNKNOWN_VOLTYPE, 0);
   CONST(VIXMNTAPI_BASIC_PARTITION, 1);
   CONST(VIXMNTAPI_GPT_PARTITION, 2);
   CONST(VIXMNTAPI_DYNAMIC_VOLUME, 3);
   CONST(VIXMNTAPI_LVM_VOLUME, 4);

   /* The mount error codes (declared by vixDiskLib.h, as in VDDK). */
   CONST(VIX_E_MNTAPI_MOUNTPT_NOT_FOUND, 24000);
   CONST(VIX_E_MNTAPI_MOUNTPT_IN_USE, 24001);
   CONST(VIX_E_MNTAPI_DISK_NOT_FOUND, 24002);
   CONST(VIX_E_MNTAPI_DISK_NOT_MOUNTED, 24003);
   CONST(VIX_E_MNTAPI_DISK_IS_MOUNTED, 24004);
   CONST(VIX_E_MNTAPI_DISK_NOT_SAFE, 24005);
   CONST(VIX_E_MNTAPI_DISK_CANT_OPEN, 24006);
   CONST(VIX_E_MNTAPI_CANT_READ_PARTS, 24007);
   CONST(VIX_E_MNTAPI_UMOUNT_APP_NOT_FOUND, 24008);
   CONST(VIX_E_MNTAPI_UMOUNT, 24009);
   CONST(VIX_E_MNTAPI_NO_MOUNTABLE_PARTITONS, 24010);
   CONST(VIX_E_MNTAPI_PARTITION_RANGE, 24011);
   CONST(VIX_E_MNTAPI_PERM, 24012);
   CONST(VIX_E_MNTAPI_DICT, 24013);
   CONST(VIX_E_MNTAPI_DICT_LOCKED, 24014);
   CONST(VIX_E_MNTAPI_OPEN_HANDLES, 24015);
   CONST(VIX_E_MNTAPI_CANT_MAKE_VAR_DIR, 24016);
   CONST(VIX_E_MNTAPI_NO_ROOT, 24017);
   CONST(VIX_E_MNTAPI_LOOP_FAILED, 24018);
   CONST(VIX_E_MNTAPI_DAEMON, 24019);
   CONST(VIX_E_MNTAPI_INTERNAL, 24020);
   CONST(VIX_E_MNTAPI_SYSTEM, 24021);
   CONST(VIX_E_MNTAPI_NO_CONNECTION_DETAILS, 24022);
   CONST(VIX_E_MNTAPI_INCOMPATIBLE_VERSION, 24300);
   CONST(VIX_E_MNTAPI_OS_ERROR, 24301);
   CONST(VIX_E_MNTAPI_DRIVE_LETTER_IN_USE, 24302);
   CONST(VIX_E_MNTAPI_DRIVE_LETTER_ALREADY_ASSIGNED, 24303);
   CONST(VIX_E_MNTAPI_VOLUME_NOT_MOUNTED, 24304);
   CONST(VIX_E_MNTAPI_VOLUME_ALREADY_MOUNTED, 24305);
   CONST(VIX_E_MNTAPI_FORMAT_FAILURE, 24306);
   CONST(VIX_E_MNTAPI_NO_DRIVER, 24307);
   CONST(VIX_E_MNTAPI_ALREADY_OPENED, 24308);
   CONST(VIX_E_MNTAPI_ITEM_NOT_FOUND, 24309);
   CONST(VIX_E_MNTAPI_UNSUPPROTED_BOOT_LOADER, 24310);
   CONST(VIX_E_MNTAPI_UNSUPPROTED_OS, 24311);
   CONST(VIX_E_MNTAPI_CODECONVERSION, 24312);
   CONST(VIX_E_MNTAPI_REGWRITE_ERROR, 24313);
   CONST(VIX_E_MNTAPI_UNSUPPORTED_FT_VOLUME, 24314);
   CONST(VIX_E_MNTAPI_PARTITION_NOT_FOUND, 24315);
   CONST(VIX_E_MNTAPI_PUTFILE_ERROR, 24316);
   CONST(VIX_E_MNTAPI_GETFILE_ERROR, 24317);
   CONST(VIX_E_MNTAPI_REG_NOT_OPENED, 24318);
   CONST(VIX_E_MNTAPI_REGDELKEY_ERROR, 24319);
   CONST(VIX_E_MNTAPI_CREATE_PARTITIONTABLE_ERROR, 24320);
   CONST(VIX_E_MNTAPI_OPEN_FAILURE, 24321);
   CONST(VIX_E_MNTAPI_VOLUME_NOT_WRITABLE, 24322);

   if (failures != 0) {
      printf("mntapi layout: %d of %d checks failed\n", failures, checks);
      return 1;
   }
   printf("mntapi layout OK (%d checks)\n", checks);
   return 0;
}
