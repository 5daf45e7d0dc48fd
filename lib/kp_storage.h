/* kp_storage: the file store under storage.root, written durably.
 *
 * Paths never come from client text: an instance lives at root/aa/bb/<h>.dcm where <h> is the
 * hex SHA-256 of its SOP Instance UID and aa, bb are the first two byte pairs of <h> (65,536
 * directories, no directory grows large). Received data first lands in root/.tmp/ (same file
 * system, so rename is atomic). A durable write is: write the temp file, fsync it, rename it into
 * place, fsync the directory (ARCHITECTURE section 3); the directory fsync can be deferred and
 * shared by a caller that commits many files at once (kp_storage_sync_dirs). */
#ifndef KP_STORAGE_H
#define KP_STORAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* "aa/bb/" + 64 hex + ".dcm" + NUL */
#define KP_STORAGE_RELPATH_MAX 80

typedef struct kp_storage kp_storage_t;

/* Opens (creating when missing) the store at root. fsync_on false skips every fsync (tests of
 * logic only; never in production). NULL on failure (logged). Owned by the caller. */
kp_storage_t *kp_storage_new(const char *root, bool fsync_on);
/* Frees and clears *st; idempotent. */
void kp_storage_destroy(kp_storage_t **st);
/* Absolute root and temp directory (borrowed). */
const char *kp_storage_root(const kp_storage_t *st);
const char *kp_storage_tmpdir(const kp_storage_t *st);

/* Relative path of the instance with this SOP Instance UID (always succeeds for a non-NULL uid). */
void kp_storage_relpath(const char *sop_uid, char out[KP_STORAGE_RELPATH_MAX]);
/* Checks a relative path has exactly the shape kp_storage_relpath makes (no traversal). */
bool kp_storage_relpath_valid(const char *rel);
/* Absolute path of a relative one (malloc'd, caller frees). */
char *kp_storage_abspath(const kp_storage_t *st, const char *rel);

/* fsyncs a file by path. 0 or KP_EIO. */
int kp_storage_fsync_path(const kp_storage_t *st, const char *path);
/* Makes tmp_path (already in the temp dir) the file at rel: fsync file, create the parent
 * directories, rename. The directory fsync is done too unless defer_dir_sync is true, in which
 * case the caller must call kp_storage_sync_dir(rel) before acknowledging. 0 or KP_EIO. */
int kp_storage_commit(kp_storage_t *st, const char *tmp_path, const char *rel, bool defer_dir_sync);
/* fsyncs the parent directory of rel. 0 or KP_EIO. */
int kp_storage_sync_dir(kp_storage_t *st, const char *rel);
/* Durable write of a memory buffer to rel (temp file, fsync, rename, directory fsync). */
int kp_storage_write(kp_storage_t *st, const char *rel, const void *buf, size_t len);
/* Creates a new empty temp file in the temp dir; writes its path (malloc'd) to *path and returns
 * an open fd, or a negative code. */
int kp_storage_tmpfile(kp_storage_t *st, char **path);
/* SHA-256 (lower-case hex) and size of a file. 0 or KP_EIO. */
int kp_storage_sha256_file(const char *path, char hex[65], int64_t *size);
/* 1 when the two files have the same bytes, 0 when they differ, KP_EIO when one is unreadable. */
int kp_storage_same_content(const char *a, const char *b);
/* Calls fn(user, rel) for every stored file under root (in directory order), stopping when fn
 * returns non-zero (that value is returned). Temp files are skipped. */
int kp_storage_walk(kp_storage_t *st, int (*fn)(void *user, const char *rel), void *user);
/* Removes temp files older than max_age_s seconds (left behind by a crash). Returns how many. */
int kp_storage_clean_tmp(kp_storage_t *st, int max_age_s);

#endif
