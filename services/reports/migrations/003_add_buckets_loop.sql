-- reports.add_buckets again, as a loop: the consumer calls it once per stats row it updates, and the first
-- version (unnest WITH ORDINALITY + ordered array_agg) cost ~2.5 times as much per call. Same results:
-- element-wise sum, missing elements count as 0, an empty histogram adds nothing.
CREATE OR REPLACE FUNCTION reports.add_buckets(a bigint[], b bigint[]) RETURNS bigint[]
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    total bigint[] := a;
BEGIN
    IF cardinality(b) = 0 THEN
        RETURN coalesce(a, '{}');
    END IF;
    IF cardinality(a) = 0 THEN
        RETURN b;
    END IF;
    FOR i IN 1 .. greatest(cardinality(a), cardinality(b)) LOOP
        total[i] := coalesce(a[i], 0) + coalesce(b[i], 0);
    END LOOP;
    RETURN total;
END
$$;
