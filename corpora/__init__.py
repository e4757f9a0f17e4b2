"""Where captions and videos come from: readers of the benchmarks' published annotation files
(adapters) and the synthetic set (synthetic). Both write the captions file that `extract` reads;
neither is an extraction stage, so they live outside pipeline/."""
