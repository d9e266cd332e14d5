"""`npc bench`: measurements written as JSON + Markdown + PNG. Reports, not tests."""
