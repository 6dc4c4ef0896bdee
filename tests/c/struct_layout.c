/*
 * struct_layout.c - checks include/vixDiskLib.h against the VDDK ABI
 * (Linux x86-64) as /work/shared/docs/vddk-api.md sections 2 and 4 give it.
 *
 * Three layers of checks:
 *   1. compile time: _Static_assert on every size and offset (disable with
 *      -DLAYOUT_RUNTIME_ONLY to get the run-time report instead of a compile
 *      error), and assignments of every exported function to a pointer of the
 *      documented type (a differing prototype is an incompatible-pointer
 *      warning, an error under -Werror);
 *   2. run time: every size, offset, field size, constant, enum value and
 *      error code compared with the documented value; each mismatch is
 *      printed and the exit status is 1;
 *   3. link time (unless -DLAYOUT_NO_LINK): every function is referenced, so
 *      the program only links if libvixDiskLib exports all of them.
 *
 * Optional: -DLAYOUT_ALL_ERROR_CODES also checks the VIX error codes a disk
 * library never returns (VM, XML, crypto, mount, HTTP ranges).
 *
 * Prints "struct layout OK" and exits 0 when everything matches.
 */

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "vixDiskLib.h"

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

static void
check_true(const char *what, int cond)
{
   checks++;
   if (!cond) {
      printf("MISMATCH %s is false\n", what);
      failures++;
   }
}

#define FSIZE(type, field) sizeof(((type *)0)->field)

#ifdef LAYOUT_RUNTIME_ONLY
#define SA(cond, msg)
#else
#define SA(cond, msg) _Static_assert(cond, msg)
#endif

/* sizeof(type) == size, checked at compile time and at run time. */
#define SIZE(type, size)                                                   \
   do {                                                                   \
      SA(sizeof(type) == (size), "sizeof(" #type ") != " #size);          \
      check_u("sizeof(" #type ")", sizeof(type), (size));                 \
   } while (0)

#define ALIGN(type, align)                                                 \
   do {                                                                   \
      struct align_probe { char c; type t; };                              \
      SA(offsetof(struct align_probe, t) == (align),                       \
         "alignof(" #type ") != " #align);                                 \
      check_u("alignof(" #type ")", offsetof(struct align_probe, t),      \
              (align));                                                    \
   } while (0)

/* offsetof(type, field) == off and sizeof(field) == fsize. */
#define FIELD(type, field, off, fsize)                                     \
   do {                                                                   \
      SA(offsetof(type, field) == (off),                                   \
         "offsetof(" #type ", " #field ") != " #off);                      \
      SA(FSIZE(type, field) == (fsize),                                    \
         "sizeof(" #type "." #field ") != " #fsize);                       \
      check_u("offsetof(" #type ", " #field ")", offsetof(type, field),   \
              (off));                                                      \
      check_u("sizeof(" #type "." #field ")", FSIZE(type, field),         \
              (fsize));                                                    \
   } while (0)

/* A constant (#define or enumerator) has the documented value. */
#define CONST(name, value)                                                 \
   check_u(#name, (unsigned long long)(long long)(name),                   \
           (unsigned long long)(long long)(value))

/* ---- compile-time type identity checks --------------------------------- */

/* The opaque handle types point at the documented struct tags. */
static struct VixDiskLibHandleStruct *const handle_tag_check =
   (VixDiskLibHandle)0;
static struct VixDiskLibConnectParam *const connection_tag_check =
   (VixDiskLibConnection)0;

/* Callback types. */
static void
log_probe(const char *fmt, va_list args)
{
   (void)fmt;
   (void)args;
}

static char
progress_probe(void *data, int percent)
{
   (void)data;
   (void)percent;
   return 1;
}

static void
completion_probe(void *data, uint64_t result)
{
   (void)data;
   (void)result;
}

static void
check_types(void)
{
   /* VixDiskLibGenericLogFunc is a *function* type: void (const char *, va_list). */
   VixDiskLibGenericLogFunc *log = log_probe;
   VixDiskLibProgressFunc progress = progress_probe;
   VixDiskLibCompletionCB completion = completion_probe;
   Bool b = 0;
   VixError e = 0;
   VixDiskLibSectorType s = 0;

   check_true("VixDiskLibGenericLogFunc accepts void (const char *, va_list)",
              log != NULL);
   check_true("VixDiskLibProgressFunc accepts Bool (*)(void *, int)",
              progress != NULL);
   check_true("VixDiskLibCompletionCB accepts void (*)(void *, VixError)",
              completion != NULL);
   check_true("VixDiskLibHandle is struct VixDiskLibHandleStruct *",
              handle_tag_check == NULL);
   check_true("VixDiskLibConnection is struct VixDiskLibConnectParam *",
              connection_tag_check == NULL);

   SIZE(VixError, 8);
   SIZE(VixDiskLibSectorType, 8);
   SIZE(Bool, 1);
   SIZE(VixDiskLibHandle, 8);
   SIZE(VixDiskLibConnection, 8);
   SIZE(VixDiskLibDiskType, 4);
   SIZE(VixDiskLibAdapterType, 4);
   SIZE(VixDiskLibCredType, 4);
   SIZE(VixDiskLibSpecType, 4);
   SIZE(uint64, 8);
   SIZE(uint32, 4);
   SIZE(uint16, 2);
   SIZE(uint8, 1);

   /* Unsigned where VDDK's are unsigned; Bool is a plain char. */
   e = (VixError)-1;
   s = (VixDiskLibSectorType)-1;
   check_true("VixError is unsigned", e > 0);
   check_true("VixDiskLibSectorType is unsigned", s > 0);
   check_true("Bool is char", sizeof(b) == sizeof(char));
#ifdef TRUE
   CONST(TRUE, 1);
#else
   check_true("TRUE is defined", 0);
#endif
#ifdef FALSE
   CONST(FALSE, 0);
#else
   check_true("FALSE is defined", 0);
#endif
}

/* ---- section 2.3: struct layouts --------------------------------------- */

static void
check_structs(void)
{
   SIZE(VixDiskLibGeometry, 12);
   ALIGN(VixDiskLibGeometry, 4);
   FIELD(VixDiskLibGeometry, cylinders, 0, 4);
   FIELD(VixDiskLibGeometry, heads, 4, 4);
   FIELD(VixDiskLibGeometry, sectors, 8, 4);

   SIZE(VixDiskLibVStorageObjectSpec, 24);
   FIELD(VixDiskLibVStorageObjectSpec, id, 0, 8);
   FIELD(VixDiskLibVStorageObjectSpec, datastoreMoRef, 8, 8);
   FIELD(VixDiskLibVStorageObjectSpec, ssId, 16, 8);

   SIZE(VixDiskLibConnectParams, 128);
   ALIGN(VixDiskLibConnectParams, 8);
   FIELD(VixDiskLibConnectParams, vmxSpec, 0, 8);
   FIELD(VixDiskLibConnectParams, serverName, 8, 8);
   FIELD(VixDiskLibConnectParams, thumbPrint, 16, 8);
   FIELD(VixDiskLibConnectParams, privateUse, 24, 8);
   FIELD(VixDiskLibConnectParams, credType, 32, 4);
   FIELD(VixDiskLibConnectParams, creds, 40, 24);
   FIELD(VixDiskLibConnectParams, creds.uid.userName, 40, 8);
   FIELD(VixDiskLibConnectParams, creds.uid.password, 48, 8);
   FIELD(VixDiskLibConnectParams, creds.sessionId.cookie, 40, 8);
   FIELD(VixDiskLibConnectParams, creds.sessionId.userName, 48, 8);
   FIELD(VixDiskLibConnectParams, creds.sessionId.key, 56, 8);
   FIELD(VixDiskLibConnectParams, creds.ticketId, 40, 8);
   FIELD(VixDiskLibConnectParams, port, 64, 4);
   FIELD(VixDiskLibConnectParams, nfcHostPort, 68, 4);
   FIELD(VixDiskLibConnectParams, vimApiVer, 72, 8);
   FIELD(VixDiskLibConnectParams, reserved, 80, 8);
   FIELD(VixDiskLibConnectParams, state, 88, 8);
   FIELD(VixDiskLibConnectParams, spec, 96, 24);
   FIELD(VixDiskLibConnectParams, spec.vStorageObjSpec, 96, 24);
   FIELD(VixDiskLibConnectParams, spec.vStorageObjSpec.id, 96, 8);
   FIELD(VixDiskLibConnectParams, spec.vStorageObjSpec.datastoreMoRef, 104, 8);
   FIELD(VixDiskLibConnectParams, spec.vStorageObjSpec.ssId, 112, 8);
   FIELD(VixDiskLibConnectParams, specType, 120, 4);

   SIZE(VixDiskLibInfo, 64);
   ALIGN(VixDiskLibInfo, 8);
   FIELD(VixDiskLibInfo, biosGeo, 0, 12);
   FIELD(VixDiskLibInfo, physGeo, 12, 12);
   FIELD(VixDiskLibInfo, capacity, 24, 8);
   FIELD(VixDiskLibInfo, adapterType, 32, 4);
   FIELD(VixDiskLibInfo, numLinks, 36, 4);
   FIELD(VixDiskLibInfo, parentFileNameHint, 40, 8);
   FIELD(VixDiskLibInfo, uuid, 48, 8);
   FIELD(VixDiskLibInfo, logicalSectorSize, 56, 4);
   FIELD(VixDiskLibInfo, physicalSectorSize, 60, 4);
   {
      VixDiskLibInfo probe;
      memset(&probe, 0, sizeof probe);
      probe.numLinks = -1;
      check_true("VixDiskLibInfo.numLinks is a signed int", probe.numLinks < 0);
   }

   SIZE(VixDiskLibCreateParams, 32);
   ALIGN(VixDiskLibCreateParams, 8);
   FIELD(VixDiskLibCreateParams, diskType, 0, 4);
   FIELD(VixDiskLibCreateParams, adapterType, 4, 4);
   FIELD(VixDiskLibCreateParams, hwVersion, 8, 2);
   FIELD(VixDiskLibCreateParams, capacity, 16, 8);
   FIELD(VixDiskLibCreateParams, logicalSectorSize, 24, 4);
   FIELD(VixDiskLibCreateParams, physicalSectorSize, 28, 4);

   SIZE(VixDiskLibBlock, 16);
   FIELD(VixDiskLibBlock, offset, 0, 8);
   FIELD(VixDiskLibBlock, length, 8, 8);

   /* VMware declares blocks[1]: sizeof is 8 + 16 = 24. */
   SIZE(VixDiskLibBlockList, 24);
   ALIGN(VixDiskLibBlockList, 8);
   FIELD(VixDiskLibBlockList, numBlocks, 0, 4);
   FIELD(VixDiskLibBlockList, blocks, 8, 16);
}

/* ---- section 2.2: constants and enums ---------------------------------- */

static void
check_constants(void)
{
   CONST(VIXDISKLIB_SECTOR_SIZE, 512);
   CONST(VIXDISKLIB_FLAG_OPEN_UNBUFFERED, 1);
   CONST(VIXDISKLIB_FLAG_OPEN_SINGLE_LINK, 2);
   CONST(VIXDISKLIB_FLAG_OPEN_READ_ONLY, 4);
   CONST(VIXDISKLIB_FLAG_OPEN_COMPRESSION_ZLIB, 16);
   CONST(VIXDISKLIB_FLAG_OPEN_COMPRESSION_FASTLZ, 32);
   CONST(VIXDISKLIB_FLAG_OPEN_COMPRESSION_SKIPZ, 64);
   CONST(VIXDISKLIB_FLAG_OPEN_COMPRESSION_MASK, 0x03f0);
   CONST(VIXDISKLIB_MIN_CHUNK_SIZE, 128);
   CONST(VIXDISKLIB_MAX_CHUNK_SIZE, 131072);
   CONST(VIXDISKLIB_MAX_CHUNK_NUMBER, 524288);

   CONST(VIXDISKLIB_DISK_MONOLITHIC_SPARSE, 1);
   CONST(VIXDISKLIB_DISK_MONOLITHIC_FLAT, 2);
   CONST(VIXDISKLIB_DISK_SPLIT_SPARSE, 3);
   CONST(VIXDISKLIB_DISK_SPLIT_FLAT, 4);
   CONST(VIXDISKLIB_DISK_VMFS_FLAT, 5);
   CONST(VIXDISKLIB_DISK_STREAM_OPTIMIZED, 6);
   CONST(VIXDISKLIB_DISK_VMFS_THIN, 7);
   CONST(VIXDISKLIB_DISK_VMFS_SPARSE, 8);
   CONST(VIXDISKLIB_DISK_UNKNOWN, 256);

   CONST(VIXDISKLIB_ADAPTER_IDE, 1);
   CONST(VIXDISKLIB_ADAPTER_SCSI_BUSLOGIC, 2);
   CONST(VIXDISKLIB_ADAPTER_SCSI_LSILOGIC, 3);
   CONST(VIXDISKLIB_ADAPTER_UNKNOWN, 256);

   CONST(VIXDISKLIB_HWVERSION_WORKSTATION_4, 3);
   CONST(VIXDISKLIB_HWVERSION_WORKSTATION_5, 4);
   CONST(VIXDISKLIB_HWVERSION_ESX30, 4);
   CONST(VIXDISKLIB_HWVERSION_WORKSTATION_6, 6);
   CONST(VIXDISKLIB_HWVERSION_ESX4X, 7);
   CONST(VIXDISKLIB_HWVERSION_ESX50, 8);
   CONST(VIXDISKLIB_HWVERSION_ESX51, 9);
   CONST(VIXDISKLIB_HWVERSION_ESX55, 10);
   CONST(VIXDISKLIB_HWVERSION_ESX60, 11);
   CONST(VIXDISKLIB_HWVERSION_ESX65, 13);
   /* CURRENT is ESX55 in <= 6.5 headers and ESX65 in 6.7/7.0 headers. */
   check_true("VIXDISKLIB_HWVERSION_CURRENT is ESX55 or ESX65",
              VIXDISKLIB_HWVERSION_CURRENT == 10 ||
              VIXDISKLIB_HWVERSION_CURRENT == 13);

   CONST(VIXDISKLIB_CRED_UID, 1);
   CONST(VIXDISKLIB_CRED_SESSIONID, 2);
   CONST(VIXDISKLIB_CRED_TICKETID, 3);
   CONST(VIXDISKLIB_CRED_SSPI, 4);
   CONST(VIXDISKLIB_CRED_UNKNOWN, 256);

   CONST(VIXDISKLIB_SPEC_VMX, 0);
   CONST(VIXDISKLIB_SPEC_VSTORAGE_OBJECT, 1);
   CONST(VIXDISKLIB_SPEC_UNKNOWN, 256);

   /* Enumerators are usable as values of their enum types. */
   {
      VixDiskLibDiskType dt = VIXDISKLIB_DISK_STREAM_OPTIMIZED;
      VixDiskLibAdapterType at = VIXDISKLIB_ADAPTER_SCSI_LSILOGIC;
      VixDiskLibCredType ct = VIXDISKLIB_CRED_SESSIONID;
      VixDiskLibSpecType st = VIXDISKLIB_SPEC_VSTORAGE_OBJECT;
      check_u("(int)(VixDiskLibDiskType)STREAM_OPTIMIZED", (unsigned)dt, 6);
      check_u("(int)(VixDiskLibAdapterType)SCSI_LSILOGIC", (unsigned)at, 3);
      check_u("(int)(VixDiskLibCredType)SESSIONID", (unsigned)ct, 2);
      check_u("(int)(VixDiskLibSpecType)VSTORAGE_OBJECT", (unsigned)st, 1);
   }

   /* The error helper macros. */
#if defined(VIX_ERROR_CODE) && defined(VIX_SUCCEEDED) && defined(VIX_FAILED)
   {
      VixError big = ((VixError)0x12345 << 32) | 16008;
      VixError ok = VIX_OK;
      check_u("VIX_ERROR_CODE(0x12345_00003e88)", VIX_ERROR_CODE(big), 16008);
      check_true("VIX_SUCCEEDED(VIX_OK)", VIX_SUCCEEDED(ok));
      check_true("!VIX_FAILED(VIX_OK)", !VIX_FAILED(ok));
      check_true("VIX_FAILED(16008 | high bits)", VIX_FAILED(big));
   }
#else
   check_true("VIX_ERROR_CODE, VIX_SUCCEEDED and VIX_FAILED are defined", 0);
#endif
}

/* ---- section 4: error codes -------------------------------------------- */

static void
check_error_codes(void)
{
   /* General. */
   CONST(VIX_OK, 0);
   CONST(VIX_E_FAIL, 1);
   CONST(VIX_E_OUT_OF_MEMORY, 2);
   CONST(VIX_E_INVALID_ARG, 3);
   CONST(VIX_E_FILE_NOT_FOUND, 4);
   CONST(VIX_E_OBJECT_IS_BUSY, 5);
   CONST(VIX_E_NOT_SUPPORTED, 6);
   CONST(VIX_E_FILE_ERROR, 7);
   CONST(VIX_E_DISK_FULL, 8);
   CONST(VIX_E_INCORRECT_FILE_TYPE, 9);
   CONST(VIX_E_CANCELLED, 10);
   CONST(VIX_E_FILE_READ_ONLY, 11);
   CONST(VIX_E_FILE_ALREADY_EXISTS, 12);
   CONST(VIX_E_FILE_ACCESS_ERROR, 13);
   CONST(VIX_E_REQUIRES_LARGE_FILES, 14);
   CONST(VIX_E_FILE_ALREADY_LOCKED, 15);
   CONST(VIX_E_VMDB, 16);
   CONST(VIX_E_NOT_SUPPORTED_ON_REMOTE_OBJECT, 20);
   CONST(VIX_E_FILE_TOO_BIG, 21);
   CONST(VIX_E_FILE_NAME_INVALID, 22);
   CONST(VIX_E_ALREADY_EXISTS, 23);
   CONST(VIX_E_BUFFER_TOOSMALL, 24);
   CONST(VIX_E_OBJECT_NOT_FOUND, 25);
   CONST(VIX_E_HOST_NOT_CONNECTED, 26);
   CONST(VIX_E_INVALID_UTF8_STRING, 27);
   CONST(VIX_E_UNFINISHED_JOB, 29);
   CONST(VIX_E_NEED_KEY, 30);
   CONST(VIX_E_OPERATION_ALREADY_IN_PROGRESS, 31);
   CONST(VIX_E_LICENSE, 32);
   CONST(VIX_E_VM_HOST_DISCONNECTED, 34);
   CONST(VIX_E_AUTHENTICATION_FAIL, 35);
   CONST(VIX_E_HOST_CONNECTION_LOST, 36);
   CONST(VIX_E_DUPLICATE_NAME, 41);
   CONST(VIX_E_ARGUMENT_TOO_BIG, 44);

   /* Handles. */
   CONST(VIX_E_INVALID_HANDLE, 1000);
   CONST(VIX_E_NOT_SUPPORTED_ON_HANDLE_TYPE, 1001);
   CONST(VIX_E_TOO_MANY_HANDLES, 1002);

   /* Host / network. */
   CONST(VIX_E_HOST_DISK_INVALID_VALUE, 14003);
   CONST(VIX_E_HOST_DISK_SECTORSIZE, 14004);
   CONST(VIX_E_HOST_FILE_ERROR_EOF, 14005);
   CONST(VIX_E_HOST_NETBLKDEV_HANDSHAKE, 14006);
   CONST(VIX_E_HOST_SOCKET_CREATION_ERROR, 14007);
   CONST(VIX_E_HOST_SERVER_NOT_FOUND, 14008);
   CONST(VIX_E_HOST_NETWORK_CONN_REFUSED, 14009);
   CONST(VIX_E_HOST_TCP_SOCKET_ERROR, 14010);
   CONST(VIX_E_HOST_TCP_CONN_LOST, 14011);
   CONST(VIX_E_HOST_NBD_HASHFILE_VOLUME, 14012);
   CONST(VIX_E_HOST_NBD_HASHFILE_INIT, 14013);
   CONST(VIX_E_HOST_SERVER_SHUTDOWN, 14014);

   /* Disk library. */
   CONST(VIX_E_DISK_INVAL, 16000);
   CONST(VIX_E_DISK_NOINIT, 16001);
   CONST(VIX_E_DISK_NOIO, 16002);
   CONST(VIX_E_DISK_PARTIALCHAIN, 16003);
   CONST(VIX_E_DISK_NEEDSREPAIR, 16006);
   CONST(VIX_E_DISK_OUTOFRANGE, 16007);
   CONST(VIX_E_DISK_CID_MISMATCH, 16008);
   CONST(VIX_E_DISK_CANTSHRINK, 16009);
   CONST(VIX_E_DISK_PARTMISMATCH, 16010);
   CONST(VIX_E_DISK_UNSUPPORTEDDISKVERSION, 16011);
   CONST(VIX_E_DISK_OPENPARENT, 16012);
   CONST(VIX_E_DISK_NOTSUPPORTED, 16013);
   CONST(VIX_E_DISK_NEEDKEY, 16014);
   CONST(VIX_E_DISK_NOKEYOVERRIDE, 16015);
   CONST(VIX_E_DISK_NOTENCRYPTED, 16016);
   CONST(VIX_E_DISK_NOKEY, 16017);
   CONST(VIX_E_DISK_INVALIDPARTITIONTABLE, 16018);
   CONST(VIX_E_DISK_NOTNORMAL, 16019);
   CONST(VIX_E_DISK_NOTENCDESC, 16020);
   CONST(VIX_E_DISK_NEEDVMFS, 16022);
   CONST(VIX_E_DISK_RAWTOOBIG, 16024);
   CONST(VIX_E_DISK_TOOMANYOPENFILES, 16027);
   CONST(VIX_E_DISK_TOOMANYREDO, 16028);
   CONST(VIX_E_DISK_RAWTOOSMALL, 16029);
   CONST(VIX_E_DISK_INVALIDCHAIN, 16030);
   CONST(VIX_E_DISK_KEY_NOTFOUND, 16052);
   CONST(VIX_E_DISK_SUBSYSTEM_INIT_FAIL, 16053);
   CONST(VIX_E_DISK_INVALID_CONNECTION, 16054);
   CONST(VIX_E_DISK_ENCODING, 16061);
   CONST(VIX_E_DISK_CANTREPAIR, 16062);
   CONST(VIX_E_DISK_INVALIDDISK, 16063);
   CONST(VIX_E_DISK_NOLICENSE, 16064);
   CONST(VIX_E_DISK_NODEVICE, 16065);
   CONST(VIX_E_DISK_UNSUPPORTEDDEVICE, 16066);
   CONST(VIX_E_DISK_CAPACITY_MISMATCH, 16067);
   CONST(VIX_E_DISK_PARENT_NOTALLOWED, 16068);
   CONST(VIX_E_DISK_ATTACH_ROOTLINK, 16069);

   /* Remoting (a local-only library reports remote requests with these). */
   CONST(VIX_E_CANNOT_CONNECT_TO_HOST, 18000);
   CONST(VIX_E_NOT_FOR_REMOTE_HOST, 18001);
   CONST(VIX_E_INVALID_HOSTNAME_SPECIFICATION, 18002);

   /* Async. */
   CONST(VIX_ASYNC, 25000);
   CONST(VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED, 26000);

#ifdef LAYOUT_ALL_ERROR_CODES
   CONST(VIX_E_NOT_FOUND, 2000);
   CONST(VIX_E_TYPE_MISMATCH, 2001);
   CONST(VIX_E_INVALID_XML, 2002);
   CONST(VIX_E_BAD_VM_INDEX, 8000);
   CONST(VIX_E_CRYPTO_UNKNOWN_ALGORITHM, 17000);
   CONST(VIX_E_CRYPTO_KEYSAFE_LOCATOR, 17012);
   CONST(VIX_E_MNTAPI_MOUNTPT_NOT_FOUND, 24000);
   CONST(VIX_E_MNTAPI_NO_CONNECTION_DETAILS, 24022);
   CONST(VIX_E_MNTAPI_INCOMPATIBLE_VERSION, 24300);
   CONST(VIX_E_MNTAPI_VOLUME_ALREADY_MOUNTED, 24305);
   CONST(VIX_E_MNTAPI_VOLUME_NOT_WRITABLE, 24322);
   CONST(VIX_E_NET_HTTP_UNSUPPORTED_PROTOCOL, 30001);
   CONST(VIX_E_NET_HTTP_GENERIC, 30202);
#endif
}

/* ---- section 3: prototypes (compile time) and exports (link time) ------ */

#ifndef LAYOUT_NO_LINK
typedef VixDiskLibGenericLogFunc LogF;
typedef char (*ProgressF)(void *, int);
typedef void (*CompletionF)(void *, uint64_t);

/*
 * Each pointer has the documented type written out with <stdint.h> types
 * (uint64 = uint64_t, uint32 = uint32_t, Bool = char, uint8 = unsigned char);
 * a header prototype that differs makes the initialisation an incompatible
 * pointer conversion, which -Werror turns into a compile error.
 */
struct api_table {
   VixError (*InitEx)(uint32_t, uint32_t, LogF *, LogF *, LogF *, const char *,
                      const char *);
   VixError (*Init)(uint32_t, uint32_t, LogF *, LogF *, LogF *, const char *);
   void (*Exit)(void);
   const char *(*ListTransportModes)(void);
   VixError (*Cleanup)(const VixDiskLibConnectParams *, uint32_t *, uint32_t *);
   VixError (*Connect)(const VixDiskLibConnectParams *, VixDiskLibConnection *);
   VixError (*PrepareForAccess)(const VixDiskLibConnectParams *, const char *);
   VixError (*ConnectEx)(const VixDiskLibConnectParams *, char, const char *,
                         const char *, VixDiskLibConnection *);
   VixError (*Disconnect)(VixDiskLibConnection);
   VixError (*EndAccess)(const VixDiskLibConnectParams *, const char *);
   VixError (*Create)(VixDiskLibConnection, const char *,
                      const VixDiskLibCreateParams *, ProgressF, void *);
   VixError (*CreateChild)(VixDiskLibHandle, const char *, VixDiskLibDiskType,
                           ProgressF, void *);
   VixError (*Open)(VixDiskLibConnection, const char *, uint32_t,
                    VixDiskLibHandle *);
   VixError (*QueryAllocatedBlocks)(VixDiskLibHandle, uint64_t, uint64_t,
                                    uint64_t, VixDiskLibBlockList **);
   VixError (*FreeBlockList)(VixDiskLibBlockList *);
   VixError (*GetInfo)(VixDiskLibHandle, VixDiskLibInfo **);
   void (*FreeInfo)(VixDiskLibInfo *);
   const char *(*GetTransportMode)(VixDiskLibHandle);
   VixError (*Close)(VixDiskLibHandle);
   VixError (*Read)(VixDiskLibHandle, uint64_t, uint64_t, unsigned char *);
   VixError (*ReadAsync)(VixDiskLibHandle, uint64_t, uint64_t, unsigned char *,
                         CompletionF, void *);
   VixError (*Write)(VixDiskLibHandle, uint64_t, uint64_t,
                     const unsigned char *);
   VixError (*WriteAsync)(VixDiskLibHandle, uint64_t, uint64_t,
                          const unsigned char *, CompletionF, void *);
   VixError (*Flush)(VixDiskLibHandle);
   VixError (*Wait)(VixDiskLibHandle);
   VixError (*ReadMetadata)(VixDiskLibHandle, const char *, char *, size_t,
                            size_t *);
   VixError (*WriteMetadata)(VixDiskLibHandle, const char *, const char *);
   VixError (*GetMetadataKeys)(VixDiskLibHandle, char *, size_t, size_t *);
   VixError (*Unlink)(VixDiskLibConnection, const char *);
   VixError (*Grow)(VixDiskLibConnection, const char *, uint64_t, char,
                    ProgressF, void *);
   VixError (*Shrink)(VixDiskLibHandle, ProgressF, void *);
   VixError (*Defragment)(VixDiskLibHandle, ProgressF, void *);
   VixError (*Rename)(const char *, const char *);
   VixError (*Clone)(VixDiskLibConnection, const char *, VixDiskLibConnection,
                     const char *, const VixDiskLibCreateParams *, ProgressF,
                     void *, char);
   char *(*GetErrorText)(VixError, const char *);
   void (*FreeErrorText)(char *);
   VixError (*IsAttachPossible)(VixDiskLibHandle, VixDiskLibHandle);
   VixError (*Attach)(VixDiskLibHandle, VixDiskLibHandle);
   VixError (*SpaceNeededForClone)(VixDiskLibHandle, VixDiskLibDiskType,
                                   uint64_t *);
   VixError (*CheckRepair)(VixDiskLibConnection, const char *, char);
   VixError (*GetConnectParams)(VixDiskLibConnection,
                                VixDiskLibConnectParams **);
   void (*FreeConnectParams)(VixDiskLibConnectParams *);
   VixDiskLibConnectParams *(*AllocateConnectParams)(void);
};

static const struct api_table api = {
   VixDiskLib_InitEx,
   VixDiskLib_Init,
   VixDiskLib_Exit,
   VixDiskLib_ListTransportModes,
   VixDiskLib_Cleanup,
   VixDiskLib_Connect,
   VixDiskLib_PrepareForAccess,
   VixDiskLib_ConnectEx,
   VixDiskLib_Disconnect,
   VixDiskLib_EndAccess,
   VixDiskLib_Create,
   VixDiskLib_CreateChild,
   VixDiskLib_Open,
   VixDiskLib_QueryAllocatedBlocks,
   VixDiskLib_FreeBlockList,
   VixDiskLib_GetInfo,
   VixDiskLib_FreeInfo,
   VixDiskLib_GetTransportMode,
   VixDiskLib_Close,
   VixDiskLib_Read,
   VixDiskLib_ReadAsync,
   VixDiskLib_Write,
   VixDiskLib_WriteAsync,
   VixDiskLib_Flush,
   VixDiskLib_Wait,
   VixDiskLib_ReadMetadata,
   VixDiskLib_WriteMetadata,
   VixDiskLib_GetMetadataKeys,
   VixDiskLib_Unlink,
   VixDiskLib_Grow,
   VixDiskLib_Shrink,
   VixDiskLib_Defragment,
   VixDiskLib_Rename,
   VixDiskLib_Clone,
   VixDiskLib_GetErrorText,
   VixDiskLib_FreeErrorText,
   VixDiskLib_IsAttachPossible,
   VixDiskLib_Attach,
   VixDiskLib_SpaceNeededForClone,
   VixDiskLib_CheckRepair,
   VixDiskLib_GetConnectParams,
   VixDiskLib_FreeConnectParams,
   VixDiskLib_AllocateConnectParams,
};

static void
check_exports(void)
{
   size_t i, n = sizeof(api) / sizeof(void (*)(void));
   void (*const *fns)(void) = (void (*const *)(void))(const void *)&api;

   for (i = 0; i < n; i++) {
      if (fns[i] == NULL) {
         printf("MISMATCH function #%zu of the table is NULL\n", i);
         failures++;
      }
      checks++;
   }
}
#endif

int
main(void)
{
   check_types();
   check_structs();
   check_constants();
   check_error_codes();
#ifndef LAYOUT_NO_LINK
   check_exports();
#endif
   if (failures != 0) {
      printf("struct layout: %d of %d checks FAILED\n", failures, checks);
      return 1;
   }
   printf("struct layout OK (%d checks)\n", checks);
   return 0;
}
