-- 0005: indexes that keep QIDO-RS study searches fast on a large index (measured by
-- bench/dicomweb's index-scale run on 1,000,000 instance rows / 20,000 studies).
-- Study results are ordered newest first (study_date DESC NULLS LAST, study_time DESC NULLS
-- LAST, pk DESC): an index in exactly that order lets the unfiltered and range-filtered
-- searches read one page instead of sorting every study (an external merge sort before).
CREATE INDEX studies_listing ON studies (study_date DESC NULLS LAST, study_time DESC NULLS LAST,
                                         pk DESC);
-- PatientName matches case-insensitively on lower(patient_name) (wildcards become LIKE): a
-- trigram index serves 'SMI*' and '*son' alike instead of lowering every row.
CREATE INDEX studies_name_lower_trgm ON studies USING gin (lower(patient_name) gin_trgm_ops);
