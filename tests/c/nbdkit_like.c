/*
 * nbdkit_like.c - drives libvixDiskLib.so the way nbdkit's VDDK plugin
 * (nbdkit >= 1.44) does: the library is dlopen'ed, every symbol the plugin
 * binds is looked up with dlsym, and the calls follow the plugin's
 * per-connection sequence (docs: /work/shared/docs/vddk-api.md 1.2 and 6.5).
 *
 * Like nbdkit it does NOT include vixDiskLib.h: the types below mirror the ABI
 * by hand (as nbdkit's vddk-structs.h does), so this program checks the
 * binary interface independently of the generated header.
 *
 * Usage:
 *   nbdkit_like LIBDIR DISK.vmdk OUT.raw [WRITE.raw|-] [BLOCKS.txt|-] [words...]
 *   nbdkit_like LIBDIR dump-plugin
 *
 *   LIBDIR      the distrib root; the library is LIBDIR/lib64/libvixDiskLib.so.N
 *   DISK.vmdk   absolute path of the disk to open (nbdkit's file=; with server=,
 *               the export name)
 *   OUT.raw     the whole disk, read with ReadAsync, is written here ("-": not kept)
 *   WRITE.raw   written into the disk with WriteAsync first (then Wait, Flush)
 *   BLOCKS.txt  QueryAllocatedBlocks result, "block OFFSET LENGTH" lines in
 *               sectors ("-" or absent: stdout)
 *   words       ro | rw (default: rw if WRITE.raw is given, else ro),
 *               single (OPEN_SINGLE_LINK), unbuffered (OPEN_UNBUFFERED),
 *               noread (skip reading the disk), noextents (skip the block list)
 *   remote words, as nbdkit's vddk plugin takes them:
 *               server=HOST|unix:PATH|URI, port=N, nfchostport=N,
 *               thumbprint=XX:XX:..., transports=nbdssl:nbd, vm=moref=..,
 *               user=NAME, password=SECRET (filled into the connect params;
 *               transports= goes to ConnectEx);
 *               and for the checks: mode=nbd|nbdssl (what GetTransportMode must
 *               report; default: nbdssl with a thumbprint, else nbd or nbdssl),
 *               anyexport (the server opens any export name: skip the check that
 *               opening a missing disk fails)
 *
 * Prints "nbdkit_like: OK" and exits 0 when every check passed; otherwise
 * prints each failure ("FAIL: ...") and exits 1.
 */

#define _GNU_SOURCE

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- the ABI, by hand (nbdkit vddk-structs.h style) -------------------- */

typedef uint64_t VixError;
#define VIX_OK 0
#define VIX_E_FAIL 1
#define VIX_E_FILE_NOT_FOUND 4
#define VIX_E_DISK_CID_MISMATCH 16008
#define VIX_ASYNC 25000

#define VIXDISKLIB_FLAG_OPEN_UNBUFFERED 1
#define VIXDISKLIB_FLAG_OPEN_SINGLE_LINK 2
#define VIXDISKLIB_FLAG_OPEN_READ_ONLY 4
#define VIXDISKLIB_SECTOR_SIZE 512
#define VIXDISKLIB_MIN_CHUNK_SIZE 128
#define VIXDISKLIB_MAX_CHUNK_NUMBER (512 * 1024)

typedef void *VixDiskLibConnection;
typedef void *VixDiskLibHandle;
typedef void VixDiskLibGenericLogFunc(const char *fmt, va_list args);
typedef void (*VixDiskLibCompletionCB)(void *data, VixError result);

enum VixDiskLibCredType {
   VIXDISKLIB_CRED_UID = 1,
   VIXDISKLIB_CRED_SESSIONID = 2,
   VIXDISKLIB_CRED_TICKETID = 3,
   VIXDISKLIB_CRED_SSPI = 4,
   VIXDISKLIB_CRED_UNKNOWN = 256
};

enum VixDiskLibSpecType {
   VIXDISKLIB_SPEC_VMX = 0,
   VIXDISKLIB_SPEC_VSTORAGE_OBJECT = 1,
   VIXDISKLIB_SPEC_UNKNOWN = 256
};

struct VixDiskLibVStorageObjectSpec {
   char *id;
   char *datastoreMoRef;
   char *ssId;
};

typedef struct VixDiskLibConnectParams {
   char *vmxSpec;
   char *serverName;
   char *thumbPrint;
   long reserved1;
   enum VixDiskLibCredType credType;
   union {
      struct {
         char *userName;
         char *password;
      } uid;
      struct {
         char *cookie;
         char *userName;
         char *key;
      } sessionId;
      void *ticketId;
   } creds;
   uint32_t port;
   uint32_t nfcHostPort;
   char *vimApiVer;
   char reserved2[8];
   void *reserved3;
   union {
      void *vmxSpec;
      struct VixDiskLibVStorageObjectSpec vStorageObjSpec;
   } spec;
   enum VixDiskLibSpecType specType;
} VixDiskLibConnectParams;

struct VixDiskLibGeometry {
   uint32_t cylinders;
   uint32_t heads;
   uint32_t sectors;
};

typedef struct VixDiskLibInfo {
   struct VixDiskLibGeometry biosGeo;
   struct VixDiskLibGeometry physGeo;
   uint64_t capacity;
   int adapterType;
   int numLinks;
   char *parentFileNameHint;
   char *uuid;
   uint32_t logicalSectorSize;  /* VDDK 7.0+ */
   uint32_t physicalSectorSize; /* VDDK 7.0+ */
} VixDiskLibInfo;

typedef struct {
   uint64_t offset;
   uint64_t length;
} VixDiskLibBlock;

typedef struct {
   uint32_t numBlocks;
   VixDiskLibBlock blocks[1];
} VixDiskLibBlockList;

typedef struct {
   int diskType;
   int adapterType;
   uint16_t hwVersion;
   uint64_t capacity;
   uint32_t logicalSectorSize;
   uint32_t physicalSectorSize;
} VixDiskLibCreateParams;

_Static_assert(sizeof(VixDiskLibConnectParams) == 128, "ConnectParams size");
_Static_assert(sizeof(VixDiskLibInfo) == 64, "Info size");
_Static_assert(sizeof(VixDiskLibCreateParams) == 32, "CreateParams size");

/*
 * The symbols nbdkit >= 1.44 binds (all required there: a missing one is
 * "required VDDK symbol ... is missing" and exit).
 */
#define STUBS                                                                  \
   STUB(VixDiskLib_InitEx, VixError,                                           \
        (uint32_t major, uint32_t minor, VixDiskLibGenericLogFunc *log_function, \
         VixDiskLibGenericLogFunc *warn_function,                              \
         VixDiskLibGenericLogFunc *panic_function, const char *lib_dir,        \
         const char *config_file))                                             \
   STUB(VixDiskLib_Exit, void, (void))                                         \
   STUB(VixDiskLib_ListTransportModes, const char *, (void))                   \
   STUB(VixDiskLib_GetErrorText, char *, (VixError err, const char *unused))   \
   STUB(VixDiskLib_FreeErrorText, void, (char *text))                          \
   STUB(VixDiskLib_FreeConnectParams, void, (VixDiskLibConnectParams *params)) \
   STUB(VixDiskLib_ConnectEx, VixError,                                        \
        (const VixDiskLibConnectParams *params, char read_only,                \
         const char *snapshot_ref, const char *transport_modes,                \
         VixDiskLibConnection *connection))                                    \
   STUB(VixDiskLib_Open, VixError,                                             \
        (const VixDiskLibConnection connection, const char *path,              \
         uint32_t flags, VixDiskLibHandle *handle))                            \
   STUB(VixDiskLib_GetTransportMode, const char *, (VixDiskLibHandle handle))  \
   STUB(VixDiskLib_Close, VixError, (VixDiskLibHandle handle))                 \
   STUB(VixDiskLib_Disconnect, VixError, (VixDiskLibConnection connection))    \
   STUB(VixDiskLib_GetInfo, VixError,                                          \
        (VixDiskLibHandle handle, VixDiskLibInfo **info))                      \
   STUB(VixDiskLib_FreeInfo, void, (VixDiskLibInfo *info))                     \
   STUB(VixDiskLib_Read, VixError,                                             \
        (VixDiskLibHandle handle, uint64_t start_sector, uint64_t nr_sectors,  \
         unsigned char *buf))                                                  \
   STUB(VixDiskLib_Write, VixError,                                            \
        (VixDiskLibHandle handle, uint64_t start_sector, uint64_t nr_sectors,  \
         const unsigned char *buf))                                            \
   STUB(VixDiskLib_Create, VixError,                                           \
        (const VixDiskLibConnection connection, const char *path,              \
         const VixDiskLibCreateParams *create_params,                          \
         void *progress_function_unused, void *progress_data_unused))          \
   STUB(VixDiskLib_Flush, VixError, (VixDiskLibHandle handle))                 \
   STUB(VixDiskLib_ReadAsync, VixError,                                        \
        (VixDiskLibHandle handle, uint64_t start_sector, uint64_t nr_sectors,  \
         unsigned char *buf, VixDiskLibCompletionCB callback, void *data))     \
   STUB(VixDiskLib_WriteAsync, VixError,                                       \
        (VixDiskLibHandle handle, uint64_t start_sector, uint64_t nr_sectors,  \
         const unsigned char *buf, VixDiskLibCompletionCB callback,            \
         void *data))                                                          \
   STUB(VixDiskLib_Wait, VixError, (VixDiskLibHandle handle))                  \
   STUB(VixDiskLib_QueryAllocatedBlocks, VixError,                             \
        (VixDiskLibHandle diskHandle, uint64_t start_sector,                   \
         uint64_t nr_sectors, uint64_t chunk_size,                             \
         VixDiskLibBlockList **block_list))                                    \
   STUB(VixDiskLib_FreeBlockList, VixError, (VixDiskLibBlockList *block_list)) \
   STUB(VixDiskLib_AllocateConnectParams, VixDiskLibConnectParams *, (void))

#define STUB(fn, ret, args) static ret(*fn) args;
STUBS
#undef STUB

/* ---- reporting ---------------------------------------------------------- */

static int failures;
static pthread_mutex_t report_lock = PTHREAD_MUTEX_INITIALIZER;

static void
failf(const char *fmt, ...)
{
   va_list ap;

   pthread_mutex_lock(&report_lock);
   printf("FAIL: ");
   va_start(ap, fmt);
   vprintf(fmt, ap);
   va_end(ap);
   printf("\n");
   fflush(stdout);
   failures++;
   pthread_mutex_unlock(&report_lock);
}

/* nbdkit's VDDK_ERROR: the library's text for an error. */
static void
vddk_error(VixError err, const char *what)
{
   char *text = VixDiskLib_GetErrorText(err, NULL);

   failf("%s: %s (VixError %" PRIu64 ")", what,
         text != NULL ? text : "(GetErrorText returned NULL)", (uint64_t)err);
   VixDiskLib_FreeErrorText(text);
}

/* ---- log callbacks, as nbdkit's vddk.c has them ------------------------- */

static __thread int error_suppression;
static int log_lines, error_lines;

/* Messages caused by a call must come synchronously on the calling thread
 * (nbdkit's suppression flag is thread-local). */
static pthread_t expected_thread;
static int expect_thread, foreign_thread_lines;

static void
note_thread(void)
{
   if (expect_thread && !pthread_equal(pthread_self(), expected_thread)) {
      __atomic_add_fetch(&foreign_thread_lines, 1, __ATOMIC_SEQ_CST);
   }
}

static char *
format_message(const char *fs, va_list args)
{
   char *str = NULL;
   size_t len;

   if (vasprintf(&str, fs, args) == -1) {
      return NULL;
   }
   /* VDDK messages end with "\n": trim trailing whitespace. */
   len = strlen(str);
   while (len > 0 && (str[len - 1] == '\n' || str[len - 1] == ' ' ||
                      str[len - 1] == '\t' || str[len - 1] == '\r')) {
      str[--len] = '\0';
   }
   return str;
}

static void
debug_function(const char *fs, va_list args)
{
   char *str = format_message(fs, args);

   __atomic_add_fetch(&log_lines, 1, __ATOMIC_SEQ_CST);
   note_thread();
   if (str != NULL) {
      fprintf(stderr, "nbdkit_like: debug: %s\n", str);
   }
   free(str);
}

static void
error_function(const char *fs, va_list args)
{
   char *str = format_message(fs, args);

   __atomic_add_fetch(&error_lines, 1, __ATOMIC_SEQ_CST);
   note_thread();
   if (str != NULL) {
      if (error_suppression) {
         fprintf(stderr, "nbdkit_like: debug (suppressed error): %s\n", str);
      } else {
         fprintf(stderr, "nbdkit_like: error: %s\n", str);
      }
   }
   free(str);
}

/* ---- loading ------------------------------------------------------------ */

static void *dl;
static int library_version;

static int
load_library(const char *libdir)
{
   static const struct {
      const char *name;
      int version;
   } libs[] = {
      { "lib64/libvixDiskLib.so.9", 9 },
      { "libvixDiskLib.so.9", 9 },
      { "lib64/libvixDiskLib.so.8", 8 },
      { "libvixDiskLib.so.8", 8 },
      { "lib64/libvixDiskLib.so.7", 7 },
      { "libvixDiskLib.so.7", 7 },
      { "lib64/libvixDiskLib.so.6", 6 },
      { "libvixDiskLib.so.6", 6 },
      { NULL, 0 }
   };
   char *first_error = NULL;
   size_t i;

   for (i = 0; libs[i].name != NULL; i++) {
      char path[4096];

      snprintf(path, sizeof path, "%s/%s", libdir, libs[i].name);
      dl = dlopen(path, RTLD_NOW);
      if (dl != NULL) {
         library_version = libs[i].version;
         printf("loaded %s (library_version=%d)\n", path, library_version);
         break;
      }
      if (first_error == NULL) {
         first_error = strdup(dlerror());
      }
   }
   if (dl == NULL) {
      failf("cannot dlopen VDDK from %s: %s", libdir,
            first_error != NULL ? first_error : "?");
      free(first_error);
      return -1;
   }
   free(first_error);

#define STUB(fn, ret, args)                                                    \
   do {                                                                        \
      dlerror();                                                               \
      *(void **)(&fn) = dlsym(dl, #fn);                                        \
      if (fn == NULL) {                                                        \
         failf("required VDDK symbol \"%s\" is missing: %s", #fn, dlerror());  \
      }                                                                        \
   } while (0);
   STUBS
#undef STUB
   return failures == 0 ? 0 : -1;
}

/* nbdkit --dump-plugin: InitEx, ListTransportModes, Exit; dladdr for the path. */
static void
dump_plugin(const char *libdir)
{
   Dl_info info;
   const char *modes;
   char *real;
   VixError err;

   printf("vddk_default_libdir=%s\n", libdir);
   printf("vddk_has_nfchostport=1\n");
   printf("vddk_library_version=%d\n", library_version);
   memset(&info, 0, sizeof info);
   if (dladdr(*(void **)&VixDiskLib_InitEx, &info) != 0 &&
       info.dli_fname != NULL) {
      real = realpath(info.dli_fname, NULL);
      printf("vddk_dll=%s\n", real != NULL ? real : info.dli_fname);
      free(real);
   } else {
      failf("dladdr(VixDiskLib_InitEx) failed");
   }
   err = VixDiskLib_InitEx(6, 5, NULL, NULL, NULL, libdir, NULL);
   if (err != VIX_OK) {
      vddk_error(err, "VixDiskLib_InitEx (dump-plugin, NULL callbacks)");
      return;
   }
   modes = VixDiskLib_ListTransportModes();
   printf("vddk_transport_modes=%s\n", modes != NULL ? modes : "(null)");
   if (modes == NULL) {
      failf("ListTransportModes returned NULL");
   }
   VixDiskLib_Exit();
#define STUB(fn, ret, args) printf("%s=1\n", #fn);
   STUBS
#undef STUB
}

/* ---- asynchronous requests --------------------------------------------- */

#define MAX_OUTSTANDING 16
#define REQUEST_BYTES (1024 * 1024)
#define REQUEST_SECTORS (REQUEST_BYTES / VIXDISKLIB_SECTOR_SIZE)

enum status { FREE, SUBMITTED, SUCCEEDED, FAILED };

struct request {
   enum status status;
   int id;
   uint64_t sector;
   uint64_t nsectors;
   unsigned char *buf;
};

static struct {
   pthread_mutex_t lock;
   pthread_cond_t cond;
   struct request req[MAX_OUTSTANDING];
   uint64_t submitted;
   uint64_t completed;
   int callbacks_before_return;
   int issuing;
} aio = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, { { FREE, 0, 0, 0, NULL } },
          0, 0, 0, 0 };

/* The completion callback: may run on a library thread, or before the
 * ReadAsync/WriteAsync call returns. */
static void
complete_command(void *vp, VixError result)
{
   struct request *r = vp;

   if (result != VIX_OK) {
      vddk_error(result, "asynchronous I/O completed with an error");
   }
   pthread_mutex_lock(&aio.lock);
   if (r->status != SUBMITTED) {
      pthread_mutex_unlock(&aio.lock);
      failf("completion callback for request %d which is not outstanding "
            "(status %d)", r->id, (int)r->status);
      return;
   }
   if (aio.issuing) {
      aio.callbacks_before_return++;
   }
   r->status = result == VIX_OK ? SUCCEEDED : FAILED;
   aio.completed++;
   pthread_cond_broadcast(&aio.cond);
   pthread_mutex_unlock(&aio.lock);
}

/* Waits until some request is no longer SUBMITTED; returns its index, or -1
 * if none is outstanding. Called with aio.lock held. */
static int
wait_any_done(void)
{
   for (;;) {
      int k, outstanding = 0;

      for (k = 0; k < MAX_OUTSTANDING; k++) {
         if (aio.req[k].status == SUCCEEDED || aio.req[k].status == FAILED) {
            return k;
         }
         if (aio.req[k].status == SUBMITTED) {
            outstanding++;
         }
      }
      if (outstanding == 0) {
         return -1;
      }
      pthread_cond_wait(&aio.cond, &aio.lock);
   }
}

/* ---- the worker: everything nbdkit does on a handle's worker thread ---- */

struct job;
static void query_argument_checks(struct job *j);

struct job {
   const char *disk;
   const char *out_path;
   const char *write_path;
   const char *blocks_path;
   int single_link;
   int do_read;
   int do_extents;
   VixDiskLibHandle handle;
   uint64_t capacity;
};

static void
do_stop(struct job *j)
{
   VixError err = VixDiskLib_Wait(j->handle);

   if (err != VIX_OK) {
      vddk_error(err, "VixDiskLib_Wait");
   }
}

/* Returns the capacity in sectors, 0 on error. */
static uint64_t
do_info(struct job *j)
{
   VixDiskLibInfo *info = NULL;
   uint64_t capacity;
   VixError err;

   err = VixDiskLib_GetInfo(j->handle, &info);
   if (err != VIX_OK) {
      vddk_error(err, "VixDiskLib_GetInfo");
      return 0;
   }
   if (info == NULL) {
      failf("GetInfo returned VIX_OK and a NULL info");
      return 0;
   }
   printf("capacity: %" PRIu64 " sectors\n", info->capacity);
   printf("numLinks: %d\n", info->numLinks);
   printf("biosGeo: %u/%u/%u physGeo: %u/%u/%u adapterType: %d\n",
          info->biosGeo.cylinders, info->biosGeo.heads, info->biosGeo.sectors,
          info->physGeo.cylinders, info->physGeo.heads, info->physGeo.sectors,
          info->adapterType);
   printf("parentFileNameHint: %s\n",
          info->parentFileNameHint != NULL ? info->parentFileNameHint : "NULL");
   printf("uuid: %s\n", info->uuid != NULL ? info->uuid : "NULL");
   if (library_version >= 7) {
      printf("sector size: logical %u physical %u\n", info->logicalSectorSize,
             info->physicalSectorSize);
      if (info->logicalSectorSize != 512 && info->logicalSectorSize != 4096) {
         failf("GetInfo: logicalSectorSize %u (a .so.%d must fill the 7.0+ "
               "fields)", info->logicalSectorSize, library_version);
      }
      if (info->physicalSectorSize != 512 && info->physicalSectorSize != 4096) {
         failf("GetInfo: physicalSectorSize %u", info->physicalSectorSize);
      }
   }
   if (info->numLinks < 1) {
      failf("GetInfo: numLinks %d < 1", info->numLinks);
   }
   capacity = info->capacity;
   VixDiskLib_FreeInfo(info);
   if (capacity == 0) {
      failf("GetInfo: capacity 0");
   }
   return capacity;
}

/* nbdkit's test_can_extents: a probe whose errors are suppressed. */
static int
test_can_extents(struct job *j)
{
   VixDiskLibBlockList *bl = NULL;
   VixError err;

   error_suppression = 1;
   err = VixDiskLib_QueryAllocatedBlocks(j->handle, 0, VIXDISKLIB_MIN_CHUNK_SIZE,
                                         VIXDISKLIB_MIN_CHUNK_SIZE, &bl);
   error_suppression = 0;
   if (err == VIX_OK) {
      VixDiskLib_FreeBlockList(bl);
      return 1;
   }
   {
      char *text = VixDiskLib_GetErrorText(err, NULL);
      printf("can_extents: QueryAllocatedBlocks probe failed: %s\n",
             text != NULL ? text : "(null)");
      VixDiskLib_FreeErrorText(text);
   }
   return 0;
}

/* Reads (or writes, from fd) the whole range [0, nsectors) in 1 MiB requests,
 * up to 16 outstanding. For reads the data go to fd (if >= 0). */
static int
do_io(struct job *j, int writing, int fd, uint64_t nsectors)
{
   const char *what = writing ? "WriteAsync" : "ReadAsync";
   uint64_t next = 0, bytes = 0;
   struct timespec t0, t1;
   int k, ret = 0, id = 0;

   for (k = 0; k < MAX_OUTSTANDING; k++) {
      aio.req[k].buf = malloc(REQUEST_BYTES);
      aio.req[k].status = FREE;
      if (aio.req[k].buf == NULL) {
         failf("out of memory");
         return -1;
      }
   }
   aio.submitted = aio.completed = 0;
   aio.callbacks_before_return = 0;
   clock_gettime(CLOCK_MONOTONIC, &t0);

   pthread_mutex_lock(&aio.lock);
   for (;;) {
      int slot = -1;

      /* Retire finished requests first. */
      for (k = 0; k < MAX_OUTSTANDING; k++) {
         struct request *r = &aio.req[k];
         if (r->status == SUCCEEDED || r->status == FAILED) {
            if (r->status == FAILED) {
               ret = -1;
            } else if (!writing && fd >= 0) {
               size_t len = r->nsectors * VIXDISKLIB_SECTOR_SIZE;
               off_t off = (off_t)(r->sector * VIXDISKLIB_SECTOR_SIZE);
               if (pwrite(fd, r->buf, len, off) != (ssize_t)len) {
                  failf("pwrite output: %s", strerror(errno));
                  ret = -1;
               }
            }
            r->status = FREE;
         }
      }
      if (next >= nsectors || ret != 0) {
         if (wait_any_done() < 0) {
            break;
         }
         continue;
      }
      for (k = 0; k < MAX_OUTSTANDING; k++) {
         if (aio.req[k].status == FREE) {
            slot = k;
            break;
         }
      }
      if (slot < 0) {
         wait_any_done();
         continue;
      }

      {
         struct request *r = &aio.req[slot];
         uint64_t n = nsectors - next < REQUEST_SECTORS ? nsectors - next
                                                         : REQUEST_SECTORS;
         VixError err;

         r->sector = next;
         r->nsectors = n;
         r->id = id++;
         if (writing) {
            size_t len = n * VIXDISKLIB_SECTOR_SIZE;
            ssize_t got;

            memset(r->buf, 0, len);
            got = pread(fd, r->buf, len, (off_t)(next * VIXDISKLIB_SECTOR_SIZE));
            if (got < 0) {
               failf("pread input: %s", strerror(errno));
               ret = -1;
               continue;
            }
         } else {
            /* Poison: a read that returns success must overwrite all of it. */
            memset(r->buf, 0xa5, n * VIXDISKLIB_SECTOR_SIZE);
         }
         r->status = SUBMITTED;
         aio.submitted++;
         aio.issuing = 1;
         /* Unlocked during the call: the callback may run right away. */
         pthread_mutex_unlock(&aio.lock);
         if (writing) {
            err = VixDiskLib_WriteAsync(j->handle, r->sector, n, r->buf,
                                        complete_command, r);
         } else {
            err = VixDiskLib_ReadAsync(j->handle, r->sector, n, r->buf,
                                       complete_command, r);
         }
         pthread_mutex_lock(&aio.lock);
         aio.issuing = 0;
         if (err != VIX_ASYNC) {
            /* Not queued: the callback must not run for it. */
            pthread_mutex_unlock(&aio.lock);
            vddk_error(err, writing ? "VixDiskLib_WriteAsync"
                                    : "VixDiskLib_ReadAsync");
            pthread_mutex_lock(&aio.lock);
            if (r->status == SUBMITTED) {
               r->status = FREE;
               aio.submitted--;
            }
            ret = -1;
            continue;
         }
         next += n;
         bytes += n * VIXDISKLIB_SECTOR_SIZE;
      }
   }
   pthread_mutex_unlock(&aio.lock);

   /* nbdkit waits before flushing and before closing. */
   do_stop(j);

   pthread_mutex_lock(&aio.lock);
   if (aio.completed != aio.submitted) {
      pthread_mutex_unlock(&aio.lock);
      failf("%s: %" PRIu64 " requests submitted, %" PRIu64 " completed",
            what, aio.submitted, aio.completed);
      ret = -1;
   } else {
      pthread_mutex_unlock(&aio.lock);
   }
   clock_gettime(CLOCK_MONOTONIC, &t1);
   {
      double s = (double)(t1.tv_sec - t0.tv_sec) +
                 (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
      printf("%s: %" PRIu64 " bytes in %" PRIu64 " requests, %.3f s, %.1f MiB/s, "
             "%d callbacks before return\n",
             writing ? "write" : "read", bytes, aio.submitted, s,
             s > 0 ? (double)bytes / 1048576.0 / s : 0.0,
             aio.callbacks_before_return);
   }
   for (k = 0; k < MAX_OUTSTANDING; k++) {
      free(aio.req[k].buf);
      aio.req[k].buf = NULL;
   }
   return ret;
}

static int
do_write_file(struct job *j)
{
   struct stat st;
   uint64_t nsectors;
   int fd, ret;
   VixError err;

   fd = open(j->write_path, O_RDONLY);
   if (fd < 0 || fstat(fd, &st) != 0) {
      failf("open %s: %s", j->write_path, strerror(errno));
      if (fd >= 0) {
         close(fd);
      }
      return -1;
   }
   nsectors = ((uint64_t)st.st_size + VIXDISKLIB_SECTOR_SIZE - 1) /
              VIXDISKLIB_SECTOR_SIZE;
   if (nsectors > j->capacity) {
      printf("write: %s is larger than the disk; writing the first %" PRIu64
             " sectors\n", j->write_path, j->capacity);
      nsectors = j->capacity;
   }
   ret = do_io(j, 1, fd, nsectors);
   close(fd);

   /* nbdkit's do_flush: Wait, then Flush. */
   err = VixDiskLib_Wait(j->handle);
   if (err != VIX_OK) {
      vddk_error(err, "VixDiskLib_Wait (flush)");
      ret = -1;
   }
   err = VixDiskLib_Flush(j->handle);
   if (err != VIX_OK) {
      vddk_error(err, "VixDiskLib_Flush");
      ret = -1;
   }
   return ret;
}

static int
do_read_file(struct job *j)
{
   int fd = -1, ret;

   if (strcmp(j->out_path, "-") != 0) {
      fd = open(j->out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd < 0) {
         failf("open %s: %s", j->out_path, strerror(errno));
         return -1;
      }
      if (ftruncate(fd, (off_t)(j->capacity * VIXDISKLIB_SECTOR_SIZE)) != 0) {
         failf("ftruncate %s: %s", j->out_path, strerror(errno));
         close(fd);
         return -1;
      }
   }
   ret = do_io(j, 0, fd, j->capacity);
   if (fd >= 0 && close(fd) != 0) {
      failf("close %s: %s", j->out_path, strerror(errno));
      ret = -1;
   }
   return ret;
}

/* nbdkit's get_extents_slow over the whole disk, in 128-sector chunks. */
static int
do_extents(struct job *j)
{
   FILE *out = stdout;
   uint64_t start = 0, end, nblocks = 0, allocated = 0;
   int ret = 0;

   if (j->blocks_path != NULL && strcmp(j->blocks_path, "-") != 0) {
      out = fopen(j->blocks_path, "w");
      if (out == NULL) {
         failf("open %s: %s", j->blocks_path, strerror(errno));
         return -1;
      }
   }
   /* The unaligned tail of the disk cannot be queried (RHEL-71694). */
   end = j->capacity / VIXDISKLIB_MIN_CHUNK_SIZE * VIXDISKLIB_MIN_CHUNK_SIZE;

   while (start < end) {
      VixDiskLibBlockList *bl = NULL;
      uint64_t nr_chunks = (end - start) / VIXDISKLIB_MIN_CHUNK_SIZE;
      uint64_t nr_sectors, prev_end = start;
      uint32_t i;
      VixError err;

      if (nr_chunks > VIXDISKLIB_MAX_CHUNK_NUMBER) {
         nr_chunks = VIXDISKLIB_MAX_CHUNK_NUMBER;
      }
      nr_sectors = nr_chunks * VIXDISKLIB_MIN_CHUNK_SIZE;
      err = VixDiskLib_QueryAllocatedBlocks(j->handle, start, nr_sectors,
                                            VIXDISKLIB_MIN_CHUNK_SIZE, &bl);
      if (err != VIX_OK) {
         vddk_error(err, "VixDiskLib_QueryAllocatedBlocks");
         ret = -1;
         break;
      }
      if (bl == NULL) {
         failf("QueryAllocatedBlocks returned VIX_OK and a NULL list");
         ret = -1;
         break;
      }
      for (i = 0; i < bl->numBlocks; i++) {
         uint64_t off = bl->blocks[i].offset, len = bl->blocks[i].length;

         fprintf(out, "block %" PRIu64 " %" PRIu64 "\n", off, len);
         nblocks++;
         allocated += len;
         if (len == 0 || off < prev_end || off + len > start + nr_sectors) {
            failf("QueryAllocatedBlocks(%" PRIu64 ", %" PRIu64 "): block %u "
                  "[%" PRIu64 ", +%" PRIu64 ") is empty, out of order or "
                  "outside the query", start, nr_sectors, i, off, len);
            ret = -1;
         }
         if (off % VIXDISKLIB_MIN_CHUNK_SIZE != 0 ||
             len % VIXDISKLIB_MIN_CHUNK_SIZE != 0) {
            failf("QueryAllocatedBlocks: block [%" PRIu64 ", +%" PRIu64
                  ") is not aligned to the %d-sector chunk", off, len,
                  VIXDISKLIB_MIN_CHUNK_SIZE);
            ret = -1;
         }
         prev_end = off + len;
      }
      VixDiskLib_FreeBlockList(bl);
      start += nr_sectors;
   }
   if (end < j->capacity) {
      /* nbdkit reports the tail as allocated data. */
      fprintf(out, "tail %" PRIu64 " %" PRIu64 "\n", end, j->capacity - end);
   }
   if (out != stdout && fclose(out) != 0) {
      failf("close %s: %s", j->blocks_path, strerror(errno));
      ret = -1;
   }
   printf("extents: %" PRIu64 " blocks, %" PRIu64 " of %" PRIu64
          " queryable sectors allocated\n", nblocks, allocated, end);
   return ret;
}

static void *
worker(void *vp)
{
   struct job *j = vp;

   if (test_can_extents(j)) {
      query_argument_checks(j);
   } else {
      failf("QueryAllocatedBlocks probe (0, 128, 128) failed");
   }
   j->capacity = do_info(j);
   if (j->capacity != 0) {
      if (j->write_path != NULL) {
         do_write_file(j);
      }
      if (j->do_read) {
         do_read_file(j);
      }
      if (j->do_extents) {
         do_extents(j);
      }
   }
   do_stop(j);
   return NULL;
}

/* ---- negative checks ---------------------------------------------------- */

static int null_callback_ran;

static void
null_callback(void *data, VixError result)
{
   (void)data;
   (void)result;
   null_callback_ran = 1;
}

static void
negative_checks(VixDiskLibConnection conn, const char *disk, int check_missing)
{
   unsigned char buf[VIXDISKLIB_SECTOR_SIZE];
   VixDiskLibHandle h = (VixDiskLibHandle)1;
   VixDiskLibInfo *info = NULL;
   char missing[4096];
   char *text;
   VixError err;
   int errors_before = error_lines;

   expected_thread = pthread_self();
   expect_thread = 1;
   err = VixDiskLib_Read(NULL, 0, 1, buf);
   if (err == VIX_OK) {
      failf("Read(NULL handle) returned VIX_OK");
   } else {
      printf("negative: Read(NULL handle) = %" PRIu64 "\n", (uint64_t)err);
   }
   err = VixDiskLib_ReadAsync(NULL, 0, 1, buf, null_callback, NULL);
   if (err == VIX_ASYNC || err == VIX_OK) {
      failf("ReadAsync(NULL handle) returned %" PRIu64, (uint64_t)err);
   }
   if (null_callback_ran) {
      failf("ReadAsync(NULL handle) ran its callback although not queued");
   }
   err = VixDiskLib_GetInfo(NULL, &info);
   if (err == VIX_OK) {
      failf("GetInfo(NULL handle) returned VIX_OK");
      VixDiskLib_FreeInfo(info);
   }

   /* A missing disk (or export) is VIX_E_FILE_NOT_FOUND, and no handle. */
   if (check_missing) {
      snprintf(missing, sizeof missing, "%s.missing-%ld.vmdk", disk, (long)getpid());
      err = VixDiskLib_Open(conn, missing, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &h);
      if (err != VIX_E_FILE_NOT_FOUND) {
         failf("Open(missing file) returned %" PRIu64 ", expected %d "
               "(VIX_E_FILE_NOT_FOUND)", (uint64_t)err, VIX_E_FILE_NOT_FOUND);
         if (err == VIX_OK) {
            VixDiskLib_Close(h);
         }
      } else if (h != NULL) {
         failf("Open(missing file) failed but left *diskHandle non-NULL");
      }
   }

   text = VixDiskLib_GetErrorText(VIX_E_DISK_CID_MISMATCH, NULL);
   if (text == NULL) {
      failf("GetErrorText(16008, NULL) returned NULL");
   } else {
      printf("negative: GetErrorText(16008) = \"%s\"\n", text);
      if (text[0] == '\0') {
         failf("GetErrorText(16008) is empty");
      }
   }
   VixDiskLib_FreeErrorText(text);
   text = VixDiskLib_GetErrorText(VIX_E_FAIL, NULL);
   if (text == NULL) {
      failf("GetErrorText(1, NULL) returned NULL");
   }
   VixDiskLib_FreeErrorText(text);
   /* An unknown code must still give a printable string (nbdkit uses %s). */
   text = VixDiskLib_GetErrorText(54321, NULL);
   if (text == NULL) {
      failf("GetErrorText(54321, NULL) returned NULL");
   }
   VixDiskLib_FreeErrorText(text);
   VixDiskLib_FreeErrorText(NULL);

   expect_thread = 0;
   if (foreign_thread_lines != 0) {
      failf("%d log messages caused by calls on the main thread arrived on "
            "another thread", foreign_thread_lines);
   }
   if (error_lines == errors_before) {
      printf("note: failed calls logged nothing through the error callback\n");
   }
}

/* Connect params the client owns (nbdkit, VMware's 7.0 sample). */
static void
params_checks(void)
{
   static char vmx[] = "moref=vm-1", thumb[] = "aa:bb", user[] = "user",
               pass[] = "secret", api[] = "6.5";
   VixDiskLibConnectParams *p = VixDiskLib_AllocateConnectParams();
   VixDiskLibConnection c = NULL;
   void *shortp;
   size_t sizes[2] = { 72, 80 };
   int i;
   VixError err;

   /* FreeConnectParams must never free strings the caller stored. */
   if (p != NULL) {
      p->vmxSpec = vmx;
      p->thumbPrint = thumb;
      p->credType = VIXDISKLIB_CRED_UID;
      p->creds.uid.userName = user;
      p->creds.uid.password = pass;
      p->vimApiVer = api;
      VixDiskLib_FreeConnectParams(p);
      printf("params: FreeConnectParams left the caller's strings alone\n");
   }
   VixDiskLib_FreeConnectParams(NULL);

   /* Older clients pass 72- and 80-byte structs (VDDK <= 6.0, 6.5 layouts):
    * valgrind reports any read past their end. */
   for (i = 0; i < 2; i++) {
      shortp = calloc(1, sizes[i]);
      if (shortp == NULL) {
         failf("out of memory");
         return;
      }
      err = VixDiskLib_ConnectEx(shortp, 1, NULL, NULL, &c);
      if (err != VIX_OK) {
         vddk_error(err, "VixDiskLib_ConnectEx with a short (old layout) struct");
      } else {
         err = VixDiskLib_Disconnect(c);
         if (err != VIX_OK) {
            vddk_error(err, "VixDiskLib_Disconnect");
         }
      }
      free(shortp);
   }
}

/* QueryAllocatedBlocks argument rules (VDDK 6.7 docs). */
static void
query_argument_checks(struct job *j)
{
   /* strict: a must; otherwise VDDK's documented behaviour, only noted. */
   static const struct {
      uint64_t start, num, chunk;
      const char *what;
      int strict;
   } bad[] = {
      { 1, 128, 128, "start not chunk-aligned", 0 },
      { 0, 100, 128, "numSectors not a multiple of the chunk", 0 },
      { 0, 128, 64, "chunkSize below VIXDISKLIB_MIN_CHUNK_SIZE", 1 },
      { 0, 262144, 262144, "chunkSize above VIXDISKLIB_MAX_CHUNK_SIZE", 1 },
      { 0, 128ULL * (VIXDISKLIB_MAX_CHUNK_NUMBER + 1), 128,
        "more than VIXDISKLIB_MAX_CHUNK_NUMBER chunks", 1 },
   };
   size_t i;

   for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
      VixDiskLibBlockList *bl = NULL;
      VixError err;

      error_suppression = 1;
      err = VixDiskLib_QueryAllocatedBlocks(j->handle, bad[i].start, bad[i].num,
                                            bad[i].chunk, &bl);
      error_suppression = 0;
      if (err == VIX_OK && bad[i].strict) {
         failf("QueryAllocatedBlocks(%" PRIu64 ", %" PRIu64 ", %" PRIu64
               ") with %s returned VIX_OK", bad[i].start, bad[i].num,
               bad[i].chunk, bad[i].what);
      } else if (err == VIX_OK) {
         printf("note: QueryAllocatedBlocks(%" PRIu64 ", %" PRIu64 ", %" PRIu64
                ") with %s returned VIX_OK (VDDK documents VIX_E_INVALID_ARG)\n",
                bad[i].start, bad[i].num, bad[i].chunk, bad[i].what);
      }
      if (err == VIX_OK) {
         VixDiskLib_FreeBlockList(bl);
      }
   }

   /* VMware's 6.7 sample frees the list with free(): it must come from malloc. */
   {
      VixDiskLibBlockList *bl = NULL;
      if (VixDiskLib_QueryAllocatedBlocks(j->handle, 0, VIXDISKLIB_MIN_CHUNK_SIZE,
                                          VIXDISKLIB_MIN_CHUNK_SIZE, &bl) == VIX_OK) {
         free(bl);
      }
   }
}

/* ---- main: the per-connection sequence --------------------------------- */

/* Threads of this process (/proc/self/status), -1 if unknown. */
static int
count_threads(void)
{
   FILE *f = fopen("/proc/self/status", "r");
   char line[256];
   int n = -1;

   if (f == NULL) {
      return -1;
   }
   while (fgets(line, sizeof line, f) != NULL) {
      if (sscanf(line, "Threads: %d", &n) == 1) {
         break;
      }
   }
   fclose(f);
   return n;
}

static void
usage(void)
{
   fprintf(stderr,
           "usage: nbdkit_like LIBDIR DISK.vmdk OUT.raw [WRITE.raw|-] [BLOCKS.txt|-] "
           "[ro|rw|single|unbuffered|noread|noextents]...\n"
           "         [server=HOST|unix:PATH|URI port=N nfchostport=N thumbprint=XX:..\n"
           "          transports=MODES vm=moref=.. user=U password=P mode=MODE anyexport]\n"
           "       nbdkit_like LIBDIR dump-plugin\n");
   exit(2);
}

int
main(int argc, char **argv)
{
   const char *pos[5] = { NULL, NULL, NULL, NULL, NULL };
   int npos = 0, i, ro = -1, single = 0, unbuffered = 0, noread = 0;
   int noextents = 0, dump = 0, anyexport = 0;
   /* nbdkit's vddk parameters for a remote server (NULL / 0: not given). */
   const char *server = NULL, *thumbprint = NULL, *transports = NULL;
   const char *vm = NULL, *user = NULL, *password = NULL, *want_mode = NULL;
   uint32_t port = 0, nfchostport = 0;
   VixDiskLibConnectParams *params = NULL;
   VixDiskLibConnection conn = NULL;
   VixDiskLibHandle handle = NULL;
   const char *modes, *mode;
   struct job job;
   pthread_t thread;
   uint32_t flags = 0;
   VixError err;
   size_t k;
   int threads_before = 0;

   for (i = 1; i < argc; i++) {
      const char *a = argv[i];
      if (!strcmp(a, "ro")) {
         ro = 1;
      } else if (!strcmp(a, "rw")) {
         ro = 0;
      } else if (!strcmp(a, "single")) {
         single = 1;
      } else if (!strcmp(a, "unbuffered")) {
         unbuffered = 1;
      } else if (!strcmp(a, "noread")) {
         noread = 1;
      } else if (!strcmp(a, "noextents")) {
         noextents = 1;
      } else if (!strcmp(a, "dump-plugin")) {
         dump = 1;
      } else if (!strcmp(a, "anyexport")) {
         anyexport = 1;
      } else if (!strncmp(a, "server=", 7)) {
         server = a + 7;
      } else if (!strncmp(a, "port=", 5)) {
         port = (uint32_t)strtoul(a + 5, NULL, 10);
      } else if (!strncmp(a, "nfchostport=", 12)) {
         nfchostport = (uint32_t)strtoul(a + 12, NULL, 10);
      } else if (!strncmp(a, "thumbprint=", 11)) {
         thumbprint = a + 11;
      } else if (!strncmp(a, "transports=", 11)) {
         transports = a + 11;
      } else if (!strncmp(a, "vm=", 3)) {
         vm = a + 3;
      } else if (!strncmp(a, "user=", 5)) {
         user = a + 5;
      } else if (!strncmp(a, "password=", 9)) {
         password = a + 9;
      } else if (!strncmp(a, "mode=", 5)) {
         want_mode = a + 5;
      } else if (npos < 5) {
         pos[npos++] = a;
      } else {
         usage();
      }
   }
   if (npos < 1 || (!dump && npos < 3)) {
      usage();
   }
   if (pos[3] != NULL && !strcmp(pos[3], "-")) {
      pos[3] = NULL;
   }
   if (ro < 0) {
      ro = pos[3] == NULL;
   }
   if (ro && pos[3] != NULL) {
      fprintf(stderr, "nbdkit_like: a write file needs rw\n");
      return 2;
   }

   if (load_library(pos[0]) != 0) {
      printf("nbdkit_like: FAILED (%d failures)\n", failures);
      return 1;
   }

   if (dump) {
      dump_plugin(pos[0]);
      goto unload;
   }

   threads_before = count_threads();

   /* .after_fork: InitEx(6, 5, log -> debug, warn and panic -> error). */
   err = VixDiskLib_InitEx(6, 5, &debug_function, &error_function,
                           &error_function, pos[0], NULL);
   if (err != VIX_OK) {
      vddk_error(err, "VixDiskLib_InitEx");
      goto unload;
   }
   modes = VixDiskLib_ListTransportModes();
   printf("transport modes: %s\n", modes != NULL ? modes : "(null)");
   if (modes == NULL || strstr(modes, "file") == NULL) {
      failf("ListTransportModes does not list \"file\"");
   }

   /* .open: AllocateConnectParams, local => all zero. */
   params = VixDiskLib_AllocateConnectParams();
   if (params == NULL) {
      failf("AllocateConnectParams returned NULL");
      goto exit_lib;
   }
   for (k = 0; k < sizeof *params; k++) {
      if (((const unsigned char *)params)[k] != 0) {
         failf("AllocateConnectParams: byte %zu of 128 is not zero", k);
         break;
      }
   }
   if (server != NULL) {
      /* As the plugin fills them for a remote server (strings it owns). */
      params->vmxSpec = (char *)vm;
      params->serverName = (char *)server;
      params->thumbPrint = (char *)thumbprint;
      if (user != NULL) {
         params->credType = VIXDISKLIB_CRED_UID;
         params->creds.uid.userName = (char *)user;
         params->creds.uid.password = (char *)password;
      }
      params->port = port;
      params->nfcHostPort = nfchostport;
      printf("server: %s port %u nfchostport %u thumbprint %s transports %s\n",
             server, port, nfchostport, thumbprint != NULL ? thumbprint : "(none)",
             transports != NULL ? transports : "(default)");
   }
   err = VixDiskLib_ConnectEx(params, ro ? 1 : 0, NULL, transports, &conn);
   if (err != VIX_OK) {
      vddk_error(err, "VixDiskLib_ConnectEx");
      goto free_params;
   }

   negative_checks(conn, pos[1], !anyexport);
   params_checks();

   if (ro) {
      flags |= VIXDISKLIB_FLAG_OPEN_READ_ONLY;
   }
   if (single) {
      flags |= VIXDISKLIB_FLAG_OPEN_SINGLE_LINK;
   }
   if (unbuffered) {
      flags |= VIXDISKLIB_FLAG_OPEN_UNBUFFERED;
   }
   err = VixDiskLib_Open(conn, pos[1], flags, &handle);
   if (err != VIX_OK) {
      vddk_error(err, "VixDiskLib_Open");
      goto disconnect;
   }
   mode = VixDiskLib_GetTransportMode(handle);
   printf("transport mode: %s\n", mode != NULL ? mode : "(null)");
   if (server == NULL) {
      if (mode == NULL || strcmp(mode, "file") != 0) {
         failf("GetTransportMode of a local disk is not \"file\"");
      }
   } else if (want_mode != NULL) {
      if (mode == NULL || strcmp(mode, want_mode) != 0) {
         failf("GetTransportMode is not \"%s\"", want_mode);
      }
   } else if (mode == NULL ||
              (strcmp(mode, "nbdssl") != 0 &&
               (thumbprint != NULL || strcmp(mode, "nbd") != 0))) {
      failf("GetTransportMode of a remote disk is not nbdssl%s",
            thumbprint != NULL ? " (a thumbprint was given)" : " or nbd");
   }

   /* One worker thread per handle issues every other call. */
   memset(&job, 0, sizeof job);
   job.disk = pos[1];
   job.out_path = pos[2];
   job.write_path = pos[3];
   job.blocks_path = pos[4];
   job.single_link = single;
   job.do_read = !noread;
   job.do_extents = !noextents;
   job.handle = handle;
   if (pthread_create(&thread, NULL, worker, &job) != 0) {
      failf("pthread_create failed");
   } else {
      pthread_join(thread, NULL);
   }

   /* .close: Wait, Close, Disconnect, FreeConnectParams. */
   err = VixDiskLib_Wait(handle);
   if (err != VIX_OK) {
      vddk_error(err, "VixDiskLib_Wait (close)");
   }
   err = VixDiskLib_Close(handle);
   if (err != VIX_OK) {
      vddk_error(err, "VixDiskLib_Close");
   }
disconnect:
   err = VixDiskLib_Disconnect(conn);
   if (err != VIX_OK) {
      vddk_error(err, "VixDiskLib_Disconnect");
   }
free_params:
   VixDiskLib_FreeConnectParams(params);
exit_lib:
   VixDiskLib_Exit();
   {
      int threads_after = count_threads();
      if (threads_after != threads_before) {
         failf("%d threads before InitEx, %d after Exit: Exit must stop every "
               "library thread (clients dlclose right after)", threads_before,
               threads_after);
      }
   }
unload:
   if (dlclose(dl) != 0) {
      failf("dlclose: %s", dlerror());
   }
   printf("log callbacks: %d debug, %d error\n", log_lines, error_lines);
   if (failures != 0) {
      printf("nbdkit_like: FAILED (%d failures)\n", failures);
      return 1;
   }
   printf("nbdkit_like: OK\n");
   return 0;
}
