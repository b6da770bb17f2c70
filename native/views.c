/*
 * views.c - the per-page text views (info/mmu, info/dirty/A.S), formatted in C
 * so that a view of a big VM costs no Python work per page.
 *
 * Both stream their text in pieces from a cursor (whole lines, at most `size`
 * bytes a call, 0 at the end), so that a view of a big VM costs the daemon one
 * piece at a time however long it is.  Negative: -errno.
 *
 * Locking: none of its own; the MMU calls it makes take mmu->lock each (a view
 * is a snapshot per call, not an atomic one).
 */
#include <stdio.h>
#include <string.h>

#include "kvmfs_internal.h"

/* info/mmu in pieces, as kvmfs_view_dirty: *cursor 0 is the header, c > 0 the
 * sptes from list position c - 1 on. */
int64_t kvmfs_view_sptes(kvmfs_mmu *mmu, uint64_t *cursor, char *buf, uint64_t size)
{
	static const char header[] = "as gfn hva uphys perms\n";
	enum { BATCH = 256 };
	struct kvmfs_spte_info s[BATCH];
	uint64_t len = 0, c = *cursor;

	if (size < 128)
		return -EINVAL;
	if (c == 0) {
		memcpy(buf, header, sizeof header - 1);
		len = sizeof header - 1;
		c = 1;
	}
	for (;;) {
		uint64_t pos = c - 1;
		int got = kvmfs_mmu_list_sptes_from(mmu, &pos, s, BATCH);
		for (int i = 0; i < got; i++) {
			char line[128];
			int l = snprintf(line, sizeof line, "%u 0x%llx 0x%llx 0x%llx R%c%c%c%c\n", s[i].as_id,
					 (unsigned long long)s[i].gfn, (unsigned long long)s[i].hva,
					 (unsigned long long)s[i].uphys,
					 s[i].flags & KVMFS_SPTE_W ? 'W' : '-', s[i].flags & KVMFS_SPTE_X ? 'X' : '-',
					 s[i].flags & KVMFS_SPTE_A ? 'A' : '-', s[i].flags & KVMFS_SPTE_D ? 'D' : '-');
			if (len + (uint64_t)l > size) {
				*cursor = ((uint64_t)s[i].as_id << KVMFS_SPTE_POS_AS_SHIFT | s[i].gfn) + 1;
				return (int64_t)len;
			}
			memcpy(buf + len, line, (size_t)l);
			len += (uint64_t)l;
		}
		c = pos + 1;
		if (got < BATCH)
			break;
	}
	*cursor = c;
	return (int64_t)len;
}

int64_t kvmfs_view_dirty(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, uint64_t *cursor,
			 char *buf, uint64_t size)
{
	static const char header[] = "page gpa\n";
	struct kvmfs_slot_info info;
	uint64_t words[64], len = 0, c = *cursor;
	int rc = kvmfs_memslot_get(mmu, as_id, id, &info);

	if (rc < 0)
		return rc;
	if (size < 64)
		return -EINVAL;
	if (c == 0) {
		memcpy(buf, header, sizeof header - 1);
		len = sizeof header - 1;
		c = 1;
	}
	for (;;) {
		uint64_t first = (c - 1) / 64;
		int64_t n = kvmfs_dirty_peek_words(mmu, as_id, id, first, words, 64);
		if (n <= 0) {                   /* the end, or the slot stopped logging */
			if (n < 0 && !len)
				return n;
			break;
		}
		for (int64_t i = 0; i < n; i++) {
			uint64_t word = words[i];
			if (first + (uint64_t)i == (c - 1) / 64)         /* skip pages already shown */
				word &= ~0ull << ((c - 1) % 64);
			for (; word; word &= word - 1) {
				uint64_t page = (first + (uint64_t)i) * 64 + (uint64_t)__builtin_ctzll(word);
				char line[64];
				int l = snprintf(line, sizeof line, "%llu 0x%llx\n", (unsigned long long)page,
						 (unsigned long long)((info.base_gfn + page) << PAGE_SHIFT));
				if (len + (uint64_t)l > size) {
					*cursor = page + 1;
					return (int64_t)len;
				}
				memcpy(buf + len, line, (size_t)l);
				len += (uint64_t)l;
			}
		}
		c = (first + (uint64_t)n) * 64 + 1;
	}
	*cursor = c;
	return (int64_t)len;
}
