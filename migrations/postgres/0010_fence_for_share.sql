-- Fencing without a race (issue 16). 0006's check read the lease with a plain SELECT
-- against now(), the transaction's start time. Two holes:
--   * a deposed leader paused inside a transaction, after its check passed, could
--     commit after another replica took the lease over: nothing tied its open
--     transaction to the lease row;
--   * a transaction begun while the lease was live could write after it expired,
--     because now() stays at the transaction's start.
-- Now the check locks the lease row FOR KEY SHARE and a takeover first locks it FOR
-- UPDATE (store::lease::Lease::try_acquire): the takeover waits until every fenced
-- transaction that wrote under the old epoch has ended, so their writes are ordered
-- before the takeover, never after. KEY SHARE rather than SHARE: the holder's own
-- renewal (an UPDATE that changes no key) does not conflict with it, so renewals
-- never queue behind the leader's writes, while FOR UPDATE does conflict. Once the
-- lease has expired no new fenced write can take the lock (the check fails first),
-- so a takeover cannot be starved. Expiry is judged by
-- clock_timestamp(), the time of the write itself. And a fenced transaction may sit
-- idle for at most half the lease's TTL (SET LOCAL idle_in_transaction_session_timeout):
-- a leader frozen mid-transaction is disconnected, its transaction rolled back and
-- its lock released, so the takeover waits at most that long and the frozen leader's
-- commit, when it wakes, is refused.
CREATE OR REPLACE FUNCTION molecule_fence_check() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    fence text := current_setting('molecule.fence', true);
    ttl interval;
BEGIN
    IF fence IS NULL OR fence = '' THEN
        RETURN COALESCE(NEW, OLD);
    END IF;
    SELECT expires_at - renewed_at INTO ttl FROM operator_leases
        WHERE name = split_part(fence, '|', 1)
          AND holder || ':' || epoch = split_part(fence, '|', 2)
          AND expires_at > clock_timestamp()
        FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'fenced: % is no longer the leader', fence USING ERRCODE = 'MF001';
    END IF;
    PERFORM set_config(
        'idle_in_transaction_session_timeout',
        GREATEST(100, (extract(epoch FROM ttl) * 500)::bigint)::text,
        true);
    RETURN COALESCE(NEW, OLD);
END $$;
